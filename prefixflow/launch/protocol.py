"""What the training job and its supervisor agree on: the job's module and the output line
protocol (one ``PREFIXFLOW_EVENT {json}`` line per event, one ``PREFIXFLOW_ERROR <message>`` line and exit code
``USER_ERROR_EXIT`` for a user error), plus the one fault-injection seam the tests use (``FAULT_ENV``, read by
``launch.train_job``)."""

JOB_MODULE = "prefixflow.launch.train_job"
EVENT_PREFIX = "PREFIXFLOW_EVENT "
ERROR_PREFIX = "PREFIXFLOW_ERROR "
USER_ERROR_EXIT = 3  # a user error: retrying will not help
FAULT_ENV = "PREFIXFLOW_FAULT"  # test-only: kill|hang:RANK:STEP[:ONCE_FILE] (see launch.train_job)
