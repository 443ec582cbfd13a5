"""What a person sees in Prefect's UI: each deployment's run form (typed fields with defaults and descriptions)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def test_every_deployment_parameter_is_a_typed_field_with_a_default_and_a_description():
    """The schema `prefect deploy` stores for each deployment (parameter_schema of the flow as a worker loads it),
    which the UI's run form renders: one typed field per parameter, none a nested object."""
    import yaml

    entrypoints = {d["name"]: d["entrypoint"] for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}
    script = ("import json\nfrom prefect.flows import load_flow_from_entrypoint\n"
              "from prefect.utilities.callables import parameter_schema\n"
              f"print(json.dumps({{name: parameter_schema(load_flow_from_entrypoint(entrypoint)).model_dump_for_openapi()"
              f" for name, entrypoint in {entrypoints!r}.items()}}))\n")
    loaded = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    schemas = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert set(schemas) == {"data", "pretrain", "branch", "genesis", "milestone-watcher"}
    for name, schema in schemas.items():
        assert "$ref" not in json.dumps(schema) and not schema.get("definitions"), (name, schema)
        required = set(schema.get("required", []))
        for field, spec in schema["properties"].items():
            types = {spec.get("type")} | {option.get("type") for option in spec.get("anyOf", [])}
            assert types & {"string", "integer", "boolean", "array"} and "object" not in types, (name, field, spec)
            assert len(spec.get("description", "")) > 10, (name, field, spec)
            assert "default" in spec or field in required, (name, field, spec)
        assert {field for field in schema["properties"] if field in required} <= {"milestone"}, name
    data = schemas["data"]["properties"]
    assert data["corpus"]["default"] == "configs/corpus/builtin.yaml" and data["corpus"]["type"] == "string"
    assert data["overrides"]["default"] == [] and data["overrides"]["items"] == {"type": "string"}
    pretrain = schemas["pretrain"]["properties"]
    assert pretrain["nproc"]["type"] == "integer" and pretrain["nproc"]["minimum"] == 1
    assert schemas["branch"]["required"] == ["milestone"]
    assert schemas["milestone-watcher"]["properties"]["launch"]["enum"] == ["deployment", "inline"]
