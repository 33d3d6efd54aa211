"""The FastChat wire protocol shared by gateway, controller and worker: NUL frames, error
codes, capability names, stop strings; imports nothing of ours."""
