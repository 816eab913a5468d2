"""Per-client isolation on ``prefixflow stack up --auth``: MLflow basic auth with one user per client, SeaweedFS
with one S3 identity per client. A client that has trained and registered a prefix is then attacked with another
client's credentials, through our CLI and straight through MLflow's and S3's APIs: every read, overwrite,
promotion and deletion is refused with a message that says so, and nothing of the first client changes."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import requests
import yaml

from prefixflow.infra.stack import StackConfig, StackError, running_stack, stack_env
from prefixflow.infra.stack.clients import check_client_name, ensure_client
from prefixflow.infra.stack.mlflow_auth import name_refusal
from support.cli import prefixflow
from support.harness import World, registry_snapshot
from support.pipeline import patched_environ, save_tiny_model, spec_dict, write_task
from support.stack_ports import stack_config_with_free_ports

BUCKET = "prefixflow"


# --- without servers -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("user", "kind", "name", "allowed"), [
    ("acme", "experiment", "prefixflow-acme", True),
    ("acme", "experiment", "prefixflow-globex", False),
    ("acme", "experiment", "Default", False),
    ("acme", "registered model", "acme-e2e", True),
    ("acme", "registered model", "acme-", False),
    ("acme", "registered model", "globex-e2e", False),
    ("acme", "registered model", "acme-../globex-e2e", False),
    ("acme", "registered model", "acmex-e2e", False),
])
def test_a_user_may_create_only_its_own_names(user, kind, name, allowed):
    assert (name_refusal(user, kind, name) is None) is allowed


@pytest.mark.parametrize(("name", "existing", "words"), [
    ("../globex", [], "is not a client name"),
    ("acme/x", [], "is not a client name"),
    ("Acme", [], "is not a client name"),
    ("acme-x", ["acme"], "cannot be added beside client 'acme'"),
    ("acme", ["acme-x"], "cannot be added beside client 'acme-x'"),
])
def test_client_names_that_could_be_confused_are_refused(name, existing, words):
    with pytest.raises(StackError, match=words):
        check_client_name(name, existing)
    check_client_name("acme", ["globex", "acme"])  # itself again and others: fine


def test_clients_need_a_stack_with_auth(tmp_path):
    with pytest.raises(StackError, match="runs without --auth"):
        ensure_client(StackConfig(state_dir=tmp_path), "acme")


# --- on a real stack with --auth -------------------------------------------------------------------------------
slow = pytest.mark.slow


def _env(config: StackConfig, root: Path, client: str | None) -> dict[str, str]:
    return {**stack_env(config.state_dir, client), "PREFIXFLOW_HOME": str(root / f"state-{client or 'admin'}"),
            "HF_HUB_OFFLINE": "1", "PREFIXFLOW_STACK_DIR": str(config.state_dir)}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    """A stack with --auth; acme has run its pipeline (v1 @champion, checkpoints mirrored to its S3 prefix).
    ``env`` is the admin's, ``clients`` acme's and globex's."""
    root = tmp_path_factory.mktemp("auth")
    config = stack_config_with_free_ports(root / "stack", auth=True)
    with running_stack(config):
        acme, globex = _env(config, root, "acme"), _env(config, root, "globex")
        spec = root / "acme.yaml"
        spec.write_text(yaml.safe_dump(spec_dict(save_tiny_model(root / "tiny-llama"), write_task(root / "t.jsonl", 80),
                                                 client="acme", task="e2e")))
        out = prefixflow("run", str(spec), "--run-key", "acme-1", env=acme)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        admin = _env(config, root, None)
        with patched_environ(admin):
            mv = _mlflow().get_model_version_by_alias("acme-e2e", "champion")
        yield World(root, admin, config=config, spec=spec, run_id=mv.run_id, clients={"acme": acme, "globex": globex})


def _mlflow():
    from mlflow import MlflowClient

    return MlflowClient()  # tracking URI and user from the environment


def _s3(env: dict[str, str]):
    import boto3

    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])


def snapshot(w: World) -> dict:
    """As the admin: acme's registered model (versions, aliases, tags), the runs, and every S3 object's hash."""
    with patched_environ(w.env):
        registry = registry_snapshot(_mlflow(), ["acme-e2e"])
    assert w.run_id in registry["runs"] and "acme-e2e" in registry["models"]
    s3 = _s3(w.env)
    objects = {o["Key"]: o["ETag"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
               for o in page.get("Contents", [])}
    return {**registry, "objects": objects}


def one_message(out, *words: str) -> None:
    text = " ".join((out.stdout + out.stderr).split())
    assert out.returncode == 2, text[-2000:]
    assert "Traceback" not in text, text[-2000:]
    assert text.count("error:") == 1, text[-2000:]
    for word in words:
        assert word in text, text[-2000:]


@slow
def test_stack_env_client_prints_that_clients_credentials_and_makes_it_once(world):
    state = world.config.state_dir
    first = prefixflow("stack", "env", "--state-dir", str(state), "--client", "acme", env={})
    again = prefixflow("stack", "env", "--state-dir", str(state), "--client", "acme", env={})
    assert first.returncode == 0 and first.stdout == again.stdout, first.stderr
    lines = dict(line.removeprefix("export ").split("=", 1) for line in first.stdout.splitlines())
    assert lines["MLFLOW_TRACKING_USERNAME"] == "acme" and lines["PREFIXFLOW_CLIENT"] == "acme"
    assert lines["PREFIXFLOW_RUN_STORAGE"] == f"s3://{BUCKET}/clients/acme/runs"
    assert lines["AWS_ACCESS_KEY_ID"] == world.clients["acme"]["AWS_ACCESS_KEY_ID"] != world.env["AWS_ACCESS_KEY_ID"]
    admin = prefixflow("stack", "env", "--state-dir", str(state), env={})
    assert "MLFLOW_TRACKING_USERNAME=admin" in admin.stdout
    creds = state / "credentials.json"
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    before = creds.read_bytes()
    for bad, words in (("../globex", "is not a client name"), ("acme-x", "cannot be added beside client 'acme'")):
        one_message(prefixflow("stack", "env", "--state-dir", str(state), "--client", bad, env={}), words)
    assert creds.read_bytes() == before


@slow
def test_the_client_reaches_its_own_prefix_run_and_checkpoints(world, tmp_path):
    out = prefixflow("pull", "acme/e2e@champion", "--out", str(tmp_path / "prefix"), env=world.clients["acme"])
    assert out.returncode == 0, out.stderr[-2000:]
    listed = _s3(world.clients["acme"]).list_objects_v2(Bucket=BUCKET, Prefix="clients/acme/")
    keys = [o["Key"] for o in listed["Contents"]]
    assert any("/checkpoints/step-" in k for k in keys), keys  # mirrored under its own prefix


@slow
def test_another_client_cannot_read_overwrite_promote_or_delete_it(world, tmp_path):
    from botocore.exceptions import ClientError
    from mlflow.exceptions import MlflowException

    before = snapshot(world)
    with patched_environ(world.env):
        experiment_id = _mlflow().get_run(world.run_id).info.experiment_id
    g = world.clients["globex"]
    refused = "refused user 'globex'"
    # through our CLI
    one_message(prefixflow("pull", "acme/e2e@champion", "--out", str(tmp_path / "stolen"), env=g), refused)
    assert not (tmp_path / "stolen").exists()
    one_message(prefixflow("promote", "acme/e2e/1", env=g), refused)
    one_message(prefixflow("rollback", "acme/e2e", env=g), refused)
    one_message(prefixflow("run", str(world.spec), "--run-key", "g-1", env=g),
                "client globex's (PREFIXFLOW_CLIENT) and the spec is client acme's")
    no_hint = {**g, "PREFIXFLOW_CLIENT": ""}  # the servers refuse it too, without our client-side check
    one_message(prefixflow("run", str(world.spec), "--run-key", "g-2", env=no_hint), refused)

    # straight through MLflow's API
    with patched_environ(g):
        c = _mlflow()
        attempts = {
            "read run": lambda: c.get_run(world.run_id),
            "read artifacts": lambda: c.download_artifacts(world.run_id, "prefix", str(tmp_path)),
            "read champion": lambda: c.get_model_version_by_alias("acme-e2e", "champion"),
            "promote": lambda: c.set_registered_model_alias("acme-e2e", "champion", "1"),
            "drop alias": lambda: c.delete_registered_model_alias("acme-e2e", "champion"),
            "new version": lambda: c.create_model_version("acme-e2e", f"runs:/{world.run_id}/prefix"),
            "retag": lambda: c.set_registered_model_tag("acme-e2e", "client", "globex"),
            "delete version": lambda: c.delete_model_version("acme-e2e", "1"),
            "delete model": lambda: c.delete_registered_model("acme-e2e"),
            "delete run": lambda: c.delete_run(world.run_id),
            "log to run": lambda: c.log_param(world.run_id, "x", "1"),
            "take the name": lambda: c.create_registered_model("acme-other"),
            "take the experiment": lambda: c.create_experiment("prefixflow-initech"),
        }
        for what, attempt in attempts.items():
            with pytest.raises(MlflowException) as err:
                attempt()
            assert err.value.error_code == "PERMISSION_DENIED", what
        with pytest.raises(MlflowException, match="may create only registered models named globex-TASK"):
            c.create_registered_model("acme-other")
        # the artifact proxy: overwrite acme's prefix file in place
        url = (f"{g['MLFLOW_TRACKING_URI']}/api/2.0/mlflow-artifacts/artifacts/{experiment_id}/"
               f"{world.run_id}/artifacts/prefix/prefix.safetensors")
        auth = (g["MLFLOW_TRACKING_USERNAME"], g["MLFLOW_TRACKING_PASSWORD"])
        assert requests.put(url, data=b"evil", auth=auth, timeout=30).status_code == 403
        assert requests.get(url, auth=auth, timeout=30).status_code == 403
        assert requests.delete(url, auth=auth, timeout=30).status_code == 403
        assert requests.get(url, auth=("globex", "wrong"), timeout=30).status_code == 401

    # straight through S3 with globex's key
    s3 = _s3(g)
    acme_keys = [k for k in before["objects"] if k.startswith("clients/acme/")]
    artifact_keys = [k for k in before["objects"] if k.startswith("mlflow/")]
    assert acme_keys and artifact_keys
    for key in (acme_keys[0], artifact_keys[0]):
        for attempt in (lambda k=key: s3.get_object(Bucket=BUCKET, Key=k),
                        lambda k=key: s3.put_object(Bucket=BUCKET, Key=k, Body=b"evil"),
                        lambda k=key: s3.delete_object(Bucket=BUCKET, Key=k),
                        lambda k=key: s3.copy_object(Bucket=BUCKET, Key="clients/globex/copy",
                                                     CopySource={"Bucket": BUCKET, "Key": k})):
            with pytest.raises(ClientError) as err:
                attempt()
            assert err.value.response["Error"]["Code"] == "AccessDenied", key
    gone = s3.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": acme_keys[0]}]})
    assert [e["Code"] for e in gone.get("Errors", [])] == ["AccessDenied"]
    for prefix in ("clients/acme/", "mlflow/", ""):
        with pytest.raises(ClientError, match="AccessDenied"):
            s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    traversal = acme_keys[0].replace("clients/acme/", "clients/globex/../acme/", 1)
    for attempt in (lambda: s3.get_object(Bucket=BUCKET, Key=traversal),
                    lambda: s3.put_object(Bucket=BUCKET, Key=traversal, Body=b"evil")):
        with pytest.raises(ClientError):
            attempt()
    # its own prefix is fine
    s3.put_object(Bucket=BUCKET, Key="clients/globex/data.jsonl", Body=b"{}")
    s3.delete_object(Bucket=BUCKET, Key="clients/globex/data.jsonl")

    after = snapshot(world)
    assert after == before


@slow
def test_an_s3_refusal_in_the_pipeline_is_one_message(world, tmp_path):
    """globex's spec reading acme's data in S3: refused by S3 at preparation, exit 2, nothing registered."""
    admin_s3 = _s3(world.env)
    admin_s3.put_object(Bucket=BUCKET, Key="clients/acme/data/t.jsonl", Body=(world.root / "t.jsonl").read_bytes())
    spec = yaml.safe_load(world.spec.read_text()) | {"client": "globex"}
    spec["data"]["source"] = f"s3://{BUCKET}/clients/acme/data/t.jsonl"
    path = tmp_path / "globex.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = prefixflow("run", str(path), "--run-key", "g-3", env=world.clients["globex"])
    one_message(out, "the S3 server refused access to s3://prefixflow/clients/acme/data/t.jsonl",
                world.clients["globex"]["AWS_ACCESS_KEY_ID"])
    with patched_environ(world.env):
        assert not _mlflow().search_registered_models("name = 'globex-e2e'")


def test_credentials_file_is_replaced_whole(tmp_path):
    """A client's secrets are stored with one atomic replace (a crash leaves the previous file)."""
    from prefixflow.infra.stack.credentials import load_credentials, save_client

    first = load_credentials(tmp_path, create=True)
    save_client(tmp_path, "acme", {"mlflow_password": "p"})
    data = json.loads((tmp_path / "credentials.json").read_text())
    assert data["access_key"] == first["access_key"] and data["clients"] == {"acme": {"mlflow_password": "p"}}
    assert not list(tmp_path.glob(".*.tmp"))
