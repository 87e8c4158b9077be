"""The core every stage may import: typed records, errors, configuration, schemas and helpers.

``types``      frozen dataclasses passed between stages (Instance, Series, Prediction, Result, Event)
``status``     what the agent reports about the device and its models (birth message, ``edge-agent models``)
``events``     every event kind as a typed model, the catalog, and what command handlers return
``topics``     the MQTT topic names (the wire contract the publisher and the command handler share)
``errors``     the exception tree (mapped to DICOM statuses, exit codes and events)
``config``     the one pydantic configuration model
``modelspec``  the ``model.toml`` schema (shared with ``deploy``)
``manifest``   the signed registry manifest and its verification (shared with ``deploy``)
``isa``        instruction-set families and where a variant's accuracy is proven
``accuracy``   metrics and the accuracy gate's comparison with FP32 (shared with ``deploy``)
``db``, ``log`` SQLite connections with the project's durability settings; structured logs
``util``       durable files (fsync, atomic write), SHA-256, timestamps: written once, here

Nothing in the core imports a stage, the service or the command line.
"""
