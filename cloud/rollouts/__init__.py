"""Fleet rollouts: waves, health gates, pause/resume/abort, rollback by re-release.

* ``spec``: what an operator asks for and the pure planning/judging rules;
* ``tables``: rollouts, their devices and decision events in SQL;
* ``gates``: health gates from stored telemetry;
* ``service``: the operations and the controller's tick;
* ``controller``: the thread that ticks.
"""
