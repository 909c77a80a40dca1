"""The Job builder: same command as the local runner, credentials from the Secret, resources,
scheduling with field-wise fallback, Kueue, ownership, hardening, podFailurePolicy, purity."""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from rloop.contracts import EXIT_INVALID_INPUT
from rloop.plan import Stage, all_stages
from rloop.runner import stage_command
from rloop.spec import parse_run, parse_spec
from rloop_operator.builders import build_job, resume_patch, stage_resources, suspend_patch
from rloop_operator.naming import ANNOTATION_SUSPENDED, LABEL_KUEUE_QUEUE, job_labels

RUN_URI = "s3://bucket/runs/team-a/tiny"
IMAGE = "registry.example/rloop-trainer:1.0"

BASE: dict[str, Any] = {
    "model": {"base": "builtin:tiny"},
    "data": {"train": {"synthetic": {}}, "eval": [{"name": "heldout", "synthetic": {"split": "heldout"}}]},
    "loop": {"iterations": 2},
    "storage": {"uri": "s3://bucket/runs"},
}


def spec_of(**patch: Any):
    doc = copy.deepcopy(BASE)
    doc.update(patch)
    return parse_spec(doc)


def job_for(spec, stage=Stage("rl", 0), attempt=0, **kw) -> dict[str, Any]:
    return build_job(
        "tiny",
        "team-a",
        "uid-123",
        spec,
        stage,
        attempt,
        run_uri=RUN_URI,
        default_image=kw.pop("default_image", IMAGE),
        **kw,
    )


def pod(job):
    return job["spec"]["template"]["spec"]


def container(job):
    (c,) = pod(job)["containers"]
    return c


def env_of(job) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(job)["env"]}


def test_command_is_the_local_runners_stage_command_for_every_stage():
    spec = spec_of()
    for stage in all_stages(spec):
        local = stage_command(RUN_URI, stage)
        assert local[1:3] == ["-m", "rloop"]
        assert container(job_for(spec, stage))["command"] == ["rloop", *local[3:]]
    assert container(job_for(spec, Stage("eval", 1, "heldout")))["command"] == [
        "rloop",
        "stage",
        "eval",
        "--run",
        RUN_URI,
        "--iteration",
        "1",
        "--set",
        "heldout",
    ]


def test_job_identity_ownership_and_labels():
    job = job_for(spec_of(), Stage("rl", 1), 2)
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    meta = job["metadata"]
    assert meta["name"] == "tiny-i1-rl-a2" and meta["namespace"] == "team-a"
    assert meta["labels"] == job_labels("tiny", Stage("rl", 1), 2)
    assert job["spec"]["template"]["metadata"]["labels"] == job_labels("tiny", Stage("rl", 1), 2)
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "rloop.dev/v1alpha1",
            "kind": "RLoopRun",
            "name": "tiny",
            "uid": "uid-123",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert "annotations" not in meta and job["spec"]["suspend"] is False


def test_retries_belong_to_the_operator_and_bad_input_fails_fast():
    spec = job_for(spec_of())["spec"]
    assert spec["backoffLimit"] == 0
    assert "ttlSecondsAfterFinished" not in spec
    assert pod({"spec": spec})["restartPolicy"] == "Never"  # podFailurePolicy requires it
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert {
        "action": "FailJob",
        "onExitCodes": {"containerName": "stage", "operator": "In", "values": [EXIT_INVALID_INPUT]},
    } in rules
    assert EXIT_INVALID_INPUT == 2


def test_env_termination_log_and_no_credentials_without_a_secret():
    job = job_for(spec_of())
    env = env_of(job)
    assert env["RLOOP_TERMINATION_LOG"] == "/dev/termination-log" == container(job)["terminationMessagePath"]
    assert container(job)["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert env["HOME"] == "/tmp"
    assert not any(k.startswith("AWS_") for k in env)


def test_s3_credentials_come_from_the_secret():
    env = env_of(job_for(spec_of(storage={"uri": "s3://bucket/runs", "secretRef": {"name": "s3-creds"}})))
    assert env["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "s3-creds", "key": "AWS_ACCESS_KEY_ID"}}
    assert env["AWS_SECRET_ACCESS_KEY"] == {
        "secretKeyRef": {"name": "s3-creds", "key": "AWS_SECRET_ACCESS_KEY"}
    }
    assert env["AWS_ENDPOINT_URL"] == {
        "secretKeyRef": {"name": "s3-creds", "key": "AWS_ENDPOINT_URL", "optional": True}
    }


def test_the_job_carries_the_resolved_run_manifest_as_a_file_pinned_by_its_digest():
    spec = spec_of()
    job = job_for(spec)
    text = job["spec"]["template"]["metadata"]["annotations"]["rloop.dev/run-manifest"]
    run = parse_run(json.loads(text))
    assert (run.metadata.name, run.metadata.namespace) == ("tiny", "team-a")
    assert run.spec == spec
    env = env_of(job)
    assert "RLOOP_RUN_MANIFEST" not in env
    assert env["RLOOP_RUN_MANIFEST_SHA256"] == hashlib.sha256(text.encode()).hexdigest()
    volume = next(v for v in pod(job)["volumes"] if "downwardAPI" in v)
    (item,) = volume["downwardAPI"]["items"]
    assert item["fieldRef"] == {"fieldPath": "metadata.annotations['rloop.dev/run-manifest']"}
    mount = next(m for m in container(job)["volumeMounts"] if m["name"] == volume["name"])
    assert env["RLOOP_RUN_MANIFEST_FILE"] == f"{mount['mountPath']}/{item['path']}" and mount["readOnly"]


def test_gpu_cpu_memory():
    spec = spec_of(resources={"default": {"cpu": "2", "memory": "8Gi"}, "rl": {"gpus": 2, "memory": "64Gi"}})
    rl = job_for(spec, Stage("rl", 0))
    scratch = "50Gi"  # DEFAULT_EPHEMERAL_STORAGE
    assert container(rl)["resources"] == {
        "requests": {"ephemeral-storage": scratch, "cpu": "2", "memory": "64Gi", "nvidia.com/gpu": "2"},
        "limits": {"ephemeral-storage": scratch, "memory": "64Gi", "nvidia.com/gpu": "2"},
    }
    # /dev/shm is memory: bounded by the pod's memory
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}} in pod(rl)["volumes"]
    verify = job_for(spec, Stage("verify", 0))
    assert container(verify)["resources"] == {
        "requests": {"ephemeral-storage": scratch, "cpu": "2", "memory": "8Gi"},
        "limits": {"ephemeral-storage": scratch, "memory": "8Gi"},
    }
    assert "dshm" not in [v["name"] for v in pod(verify)["volumes"]]  # no GPUs: no shared memory
    assert container(job_for(spec_of(), Stage("init")))["resources"] == {
        "requests": {"ephemeral-storage": scratch}, "limits": {"ephemeral-storage": scratch}
    }


def test_scratch_space_and_shm_are_sized_and_deadlines_set_per_stage_kind():
    spec = spec_of(resources={
        "default": {"ephemeralStorage": "100Gi"},
        "rl": {"gpus": 8, "shmSize": "32Gi", "activeDeadlineSeconds": 172800},
        "eval": {"gpus": 1},
    })
    rl = job_for(spec, Stage("rl", 0))
    assert rl["spec"]["activeDeadlineSeconds"] == 172800
    assert {"name": "tmp", "emptyDir": {"sizeLimit": "100Gi"}} in pod(rl)["volumes"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "32Gi"}} in pod(rl)["volumes"]
    assert container(rl)["resources"]["requests"]["ephemeral-storage"] == "100Gi"
    evaluation = job_for(spec, Stage("eval", 0, eval_set="heldout"))
    assert "activeDeadlineSeconds" not in evaluation["spec"]  # unset: no deadline
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}} in pod(evaluation)["volumes"]


def test_the_job_records_the_spec_generation_it_was_made_from():
    assert job_for(spec_of(), generation=7)["metadata"]["annotations"] == {"rloop.dev/spec-generation": "7"}
    assert "annotations" not in job_for(spec_of())["metadata"]


def test_scheduling_falls_back_field_by_field_to_the_default():
    spec = spec_of(
        resources={
            "default": {
                "image": "reg/default:1",
                "nodeSelector": {"pool": "cpu"},
                "tolerations": [
                    {
                        "key": "dedicated",
                        "operator": "Equal",
                        "value": "ml",
                        "effect": "NoSchedule",
                        "tolerationSeconds": 60,
                    }
                ],
                "priorityClassName": "batch-low",
            },
            "rl": {"image": "reg/gpu:1", "gpus": 1, "nodeSelector": {"pool": "gpu"}},
        }
    )
    rl = job_for(spec, Stage("rl", 0))
    assert container(rl)["image"] == "reg/gpu:1"
    assert pod(rl)["nodeSelector"] == {"pool": "gpu"}
    assert pod(rl)["tolerations"] == [
        {
            "key": "dedicated",
            "operator": "Equal",
            "value": "ml",
            "effect": "NoSchedule",
            "tolerationSeconds": 60,
        }
    ]
    assert pod(rl)["priorityClassName"] == "batch-low"
    verify = job_for(spec, Stage("verify", 0))
    assert container(verify)["image"] == "reg/default:1"
    assert pod(verify)["nodeSelector"] == {"pool": "cpu"}
    assert stage_resources(spec, "rl").gpus == 1 and stage_resources(spec, "verify").gpus is None


def test_image_falls_back_to_the_operators_default_and_unset_scheduling_is_omitted():
    job = job_for(spec_of(), default_image="reg/operator-default:2")
    assert container(job)["image"] == "reg/operator-default:2"
    assert not {"nodeSelector", "tolerations", "priorityClassName"} & set(pod(job))


def test_kueue_label_on_the_job_only():
    job = job_for(spec_of(queueName="team-a-queue"))
    assert job["metadata"]["labels"][LABEL_KUEUE_QUEUE] == "team-a-queue"
    assert LABEL_KUEUE_QUEUE not in job["spec"]["template"]["metadata"]["labels"]
    assert LABEL_KUEUE_QUEUE not in job_for(spec_of())["metadata"]["labels"]


def test_hardened_pod():
    job = job_for(spec_of())
    assert pod(job)["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "runAsGroup": 1000,
        "fsGroup": 1000,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert container(job)["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
    }
    assert {"name": "tmp", "mountPath": "/tmp"} in container(job)["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {"sizeLimit": "50Gi"}} in pod(job)["volumes"]
    assert pod(job)["automountServiceAccountToken"] is False
    assert container(job)["ports"] == [{"name": "metrics", "containerPort": 9400, "protocol": "TCP"}]


def test_suspended_run_builds_a_suspended_marked_job():
    job = job_for(spec_of(suspend=True))
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["annotations"] == {ANNOTATION_SUSPENDED: "true"}
    assert suspend_patch()["spec"] == {"suspend": True}
    assert resume_patch() == {
        "metadata": {"annotations": {ANNOTATION_SUSPENDED: None}},
        "spec": {"suspend": False},
    }


def test_pure_and_json_serialisable():
    spec = spec_of(resources={"default": {"tolerations": [{"operator": "Exists"}]}, "rl": {"gpus": 1}})
    a, b = job_for(spec), job_for(spec)
    assert a == b and a is not b
    assert json.loads(json.dumps(a)) == a
    a["metadata"]["labels"]["x"] = "y"  # no shared mutable state between calls
    assert "x" not in job_for(spec)["metadata"]["labels"]


def test_tracker_secrets_reach_every_stage_pod_as_env_from():
    tracking = {"mlflow": {"uri": "http://mlflow.mlflow:5000", "secretRef": {"name": "mlflow-creds"}},
                "wandb": {"project": "rloop", "secretRef": {"name": "wandb-key"}}}
    spec = spec_of(tracking=tracking)
    import kubernetes_validate

    kubernetes_validate.validate(job_for(spec), "1.31", strict=True)  # envFrom where the Job schema has it
    for stage in all_stages(spec):
        c = container(job_for(spec, stage))
        assert c["envFrom"] == [{"secretRef": {"name": "mlflow-creds", "optional": True}},
                                {"secretRef": {"name": "wandb-key", "optional": True}}], stage.id
        assert not any(k.startswith(("MLFLOW_", "WANDB_")) for k in env_of(job_for(spec, stage)))
    one = spec_of(tracking={"mlflow": {"uri": "http://m:5000", "secretRef": {"name": "shared"}},
                            "wandb": {"project": "p", "secretRef": {"name": "shared"}}})
    assert container(job_for(one))["envFrom"] == [{"secretRef": {"name": "shared", "optional": True}}]


def test_no_env_from_without_tracker_secrets():
    assert "envFrom" not in container(job_for(spec_of()))
    assert "envFrom" not in container(job_for(spec_of(tracking={"tensorboard": {}, "mlflow": {"uri": "http://m"}})))
