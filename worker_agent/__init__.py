"""The ``pypline-agent`` daemon that serves ``multi_proc`` stages to remote pipelines.

Installed as ``pypline.worker_agent``. Not implemented yet (see the remote-agents issue).
"""
