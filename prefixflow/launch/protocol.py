"""What the training job and its supervisor agree on: the job's module and the output line
protocol (one ``PREFIXFLOW_EVENT {json}`` line per event, one ``PREFIXFLOW_ERROR <message>`` line and exit code
``USER_ERROR_EXIT`` for a user error; a ``pruned`` event and ``PRUNED_EXIT`` for a sweep trial its pruner stopped),
plus the one test seam (``STEP_HOOK_ENV``: a hook run after each step,
read by ``launch.train_job``; the tests kill or hang ranks with it)."""

from prefixflow import settings

JOB_MODULE = "prefixflow.launch.train_job"
PACK_MODULE = "prefixflow.launch.pack_job"  # several runs' trainings in one process (launch.packing)
EVENT_PREFIX = "PREFIXFLOW_EVENT "
ERROR_PREFIX = "PREFIXFLOW_ERROR "
USER_ERROR_EXIT = 3  # a user error: retrying will not help
PRUNED_EXIT = 4  # a sweep trial stopped early by its pruner (after a "pruned" event): not a failure
STEP_HOOK_ENV = settings.STEP_HOOK_ENV  # module:factory -> hook(trainer) after each step, or None
