"""Fleet rollouts: waves, health gates, pause/resume/abort, rollback by re-release.

* ``spec``: what an operator asks for and the pure planning/judging rules;
* ``tables``: rollouts, their devices and decision events in SQL;
* ``gates``: health gates from stored telemetry;
* ``service``: ``RolloutService``, the operations and the controller's tick
  (the one entry point; the modules below are its parts);
* ``steering``: a tick's judgement of one rollout;
* ``rollback``: abort, rollback by re-release, recall;
* ``views``: status, list, events and devices as JSON;
* ``journal``: decision events and their counts;
* ``errors``: the refusals, and the checks that raise them;
* ``controller``: the thread that ticks.
"""
