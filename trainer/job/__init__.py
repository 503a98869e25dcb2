"""The job's surroundings, which any stage may use: its frozen context, the process set-up
(threads, devices, distributed ranks), the stop request (SIGTERM), and where progress is
reported (metrics log, telemetry, the Kubeflow TrainJob status)."""
