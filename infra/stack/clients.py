"""Clients of a stack started with ``--auth``: ``ensure_client`` gives a client

- an MLflow user (``mlflow/auth.db``) that manages its experiment ``prefixflow-CLIENT`` (made here by the admin,
  so no one else can take the name) and owns the registered models ``CLIENT-TASK`` it creates; it sees nothing
  else (``default_permission = NO_PERMISSIONS``), and ``mlflow_auth`` stops it creating other clients' names;
- an S3 identity (SeaweedFS's IAM API on the S3 port) whose policy allows reading, writing, listing and deleting
  under ``s3://BUCKET/clients/CLIENT/`` only;

and stores their secrets in ``credentials.json``. It is idempotent and safe to rerun after a failure: the
password is stored before it is set, and a key pair is replaced only when the stored one is not the server's.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from unittest import mock

from prefixflow.services.spec import NAME_PATTERN, experiment_name

from .config import REGION, StackConfig, StackError
from .credentials import ADMIN_USER, load_credentials, new_password, save_client
from .services import client_prefix

# Deferred imports: mlflow and boto3 are deferred to the calls that make a client's user and S3 identity.

POLICY_NAME = "prefixflow-client"


def check_client_name(name: str, existing: list[str]) -> None:
    """StackError unless ``name`` is a client name that cannot be confused with one of ``existing``."""
    if not re.match(NAME_PATTERN, name):
        raise StackError(f"{name!r} is not a client name: use lowercase letters, digits and inner hyphens (1-40), "
                         "the same as the spec's `client`")
    for other in existing:
        short, long = sorted((name, other), key=len)
        if other != name and long.startswith(short + "-"):
            raise StackError(f"client {name!r} cannot be added beside client {other!r}: registered models are "
                             f"named CLIENT-TASK, so {long}-TASK could also be {short}'s; choose a name that neither "
                             "starts with the other followed by '-'")


def client_policy(bucket: str, client: str) -> dict:
    """The S3 policy of a client: its own key prefix, nothing else (not even the names of others' keys)."""
    prefix = client_prefix(client)
    return {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Resource": [f"arn:aws:s3:::{bucket}/{prefix}*"],
         "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"]},  # PutObject covers multipart uploads
        {"Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": [f"arn:aws:s3:::{bucket}"],
         "Condition": {"StringLike": {"s3:prefix": [f"{prefix}*"]}}},
    ]}


def _as_admin(creds: dict):
    """MLflow's clients read the user from the environment: the stack's admin for the length of the block."""

    return mock.patch.dict(os.environ, {"MLFLOW_TRACKING_USERNAME": ADMIN_USER,
                                        "MLFLOW_TRACKING_PASSWORD": creds["mlflow_password"]})


def _mlflow_user(config: StackConfig, creds: dict, name: str, password: str) -> None:
    """Create (or reset the password of) MLflow user ``name``; make its experiment and let it manage it."""

    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    with warnings.catch_warnings():  # the server package's import warns about Starlette's WSGI middleware
        warnings.simplefilter("ignore")
        from mlflow.server.auth.client import AuthServiceClient

    uri = config.urls()["mlflow"]
    with _as_admin(creds):
        users = AuthServiceClient(uri)
        try:
            users.get_user(name)
        except MlflowException:
            users.create_user(name, password)
        else:
            users.update_user_password(name, password)
        mlflow = MlflowClient(tracking_uri=uri)
        exp = mlflow.get_experiment_by_name(experiment_name(name))
        exp_id = exp.experiment_id if exp else mlflow.create_experiment(experiment_name(name))
        held = users.get_user_permission(name, "experiment", exp_id).permission
        if held != "MANAGE":
            if held != "NO_PERMISSIONS":  # another grant (e.g. READ given by hand): replace it
                users.revoke_user_permission(name, "experiment", exp_id)
            users.grant_user_permission(name, "experiment", exp_id, "MANAGE")


def _s3_identity(config: StackConfig, creds: dict, name: str, entry: dict) -> dict:
    """The client's SeaweedFS identity with its policy; returns ``entry`` with a valid key pair."""
    import boto3
    from botocore.exceptions import ClientError

    iam = boto3.client("iam", endpoint_url=config.urls()["s3"], region_name=REGION,
                       aws_access_key_id=creds["access_key"], aws_secret_access_key=creds["secret_key"])
    try:
        iam.create_user(UserName=name)
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") != "EntityAlreadyExists":
            raise
    held = [k["AccessKeyId"] for k in iam.list_access_keys(UserName=name)["AccessKeyMetadata"]]
    if entry.get("access_key") not in held:
        key = iam.create_access_key(UserName=name)["AccessKey"]
        entry = entry | {"access_key": key["AccessKeyId"], "secret_key": key["SecretAccessKey"]}
        save_client(config.state_dir, name, entry)
    for stale in held:
        if stale != entry["access_key"]:
            iam.delete_access_key(UserName=name, AccessKeyId=stale)
    iam.put_user_policy(UserName=name, PolicyName=POLICY_NAME,
                        PolicyDocument=json.dumps(client_policy(config.bucket, name)))
    return entry


def ensure_client(config: StackConfig, name: str) -> dict:
    """The secrets of client ``name`` (``mlflow_password``, ``access_key``, ``secret_key``), making the client on
    first use (see the module docstring). StackError when the stack runs without ``auth`` or the name is bad."""
    state = config.state_dir
    if not config.auth:
        raise StackError(f"the stack in {state} runs without --auth, so every client uses the admin's credentials "
                         "(`prefixflow stack env`); for one set per client restart it with "
                         "`prefixflow stack down && prefixflow stack up --auth`")
    creds = load_credentials(state, create=False)
    check_client_name(name, list(creds["clients"]))
    entry = dict(creds["clients"].get(name) or {"mlflow_password": new_password()})
    save_client(state, name, entry)
    _mlflow_user(config, creds, name, entry["mlflow_password"])
    return _s3_identity(config, creds, name, entry)
