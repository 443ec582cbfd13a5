"""Prefect flows that read like the pipeline: data → trunk → a branch per milestone.

    data.py      data_flow          corpus → clean + dedup → tokenizer → token shards, recorded
    pretrain.py  pretrain_flow      the trunk task
    branches.py  branch_flow        one branch off a milestone, registered
    tree.py      genesis_flow       all of it; milestone_watcher, the safety net for missed branches
    params.py    shared defaults and parameter types; arguments resolved into what the tasks take
    demo.py      `genesis demo`: genesis_flow on a fresh CPU machine

NOTE: no file here is named like a top-level package (genesis.py, branch.py, lineage.py, ...): Prefect loads a
deployment's entrypoint as a module named after its file, with flows/ first on sys.path, so a flows/branch.py
would stand in for the `branch` package in the worker (tests/test_deployments.py loads every entrypoint so).
"""
