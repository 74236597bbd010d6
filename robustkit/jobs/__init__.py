"""The jobs behind the CLI: :func:`.attack.attack_model` (``robustkit attack``) and
:func:`.run.run_experiment` (``robustkit run``). Each writes a complete folder through the
post-sweep stages (:mod:`robustkit.stages`); what is printed is :mod:`robustkit.terminal`'s."""
