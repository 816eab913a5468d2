"""Pruning of sweep trials inside the training job: after each validation the main rank reports the validation
loss to the trial's Optuna study and asks its pruner; every rank learns the answer (one collective), and a pruned
trial stops on all ranks at once by raising :class:`Pruned` (the job then emits a ``pruned`` event and exits
with ``PRUNED_EXIT``).

The job file's ``pruning`` holds ``{"storage": URL, "study": NAME, "trial_id": ID, "pruner": CONFIG}``. Optuna
does not store the pruner, so the job builds the sweep's own from CONFIG. The study lives in the state folder's
SQLite file (or the database the sweep was given): ranks on any machine that can reach it can report."""

from __future__ import annotations

from collections.abc import Callable

# Deferred imports: optuna and the sweep service are deferred: only sweep trials load them, inside the training job.


class Pruned(Exception):
    """The trial's pruner stopped it at ``step`` (validation loss ``loss``)."""

    def __init__(self, step: int, loss: float) -> None:
        super().__init__(f"pruned at step {step} (validation loss {loss:.4f})")
        self.step, self.loss = step, loss


def pruning_hook(pruning: dict, is_main: bool) -> Callable:
    """A step hook (``Trainer.step_hooks``) for the trial described by ``pruning``."""
    trial = None
    if is_main:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        from prefixflow.services.sweeps import make_pruner

        study = optuna.load_study(study_name=pruning["study"], storage=pruning["storage"],
                                  pruner=make_pruner(pruning["pruner"]))
        trial = optuna.trial.Trial(study, int(pruning["trial_id"]))
    reported: set[int] = set()

    def hook(trainer) -> None:
        last = trainer.history[-1] if trainer.history else {}
        if "eval_loss" not in last or last.get("step") != trainer.step or trainer.step in reported:
            return
        reported.add(trainer.step)
        prune = False
        if trial is not None:
            trial.report(float(last["eval_loss"]), trainer.step)
            prune = trial.should_prune()
        if not trainer._all_ranks(not prune):
            raise Pruned(trainer.step, float(last["eval_loss"]))

    return hook
