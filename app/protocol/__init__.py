"""The FastChat wire protocol: frames, error codes, capabilities, stop strings.

Shared by the gateway, the controller and the worker; imports nothing of ours."""
