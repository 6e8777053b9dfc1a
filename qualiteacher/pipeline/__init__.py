"""The orchestration layer: a task's staged recipe, from its configuration to the registered model.

Modules, each importing only those listed before it (no cycle; this file imports none of them):

``config``    the stage catalogue and the typed, frozen :class:`PipelineConfig` (checks keys and types)
``resolve``   base + task + preset YAML, user files and ``--key=value`` overrides → ``PipelineConfig``
``state``     ``OUT/state.json``: MLflow run ids and finished stages
``sections``  the training stages' LightningCLI sections: student applied, parsed, checked; ``StagePlan``
``grids``     image grids of a stage-3 student (training callback and evaluation)
``stages``    one module per stage: ``data``, ``train``, ``evaluate``, ``register``
``run``       ``run_pipeline``: the stage graph, resume, MLflow runs; hands each stage its typed pieces
``cli``       ``qualiteacher pipeline TASK`` and ``pipelines/<task>.py``
``api``       the public API for the layers above (the study, ``pipelines/*.py``)
"""
