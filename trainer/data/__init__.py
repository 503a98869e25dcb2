"""The images: class folders and their split, decoding, the input pipeline, augmentation
and the policy that tests it on the data, class balance, unlabelled images."""
