"""infra/: every kustomize overlay renders offline (kubectl kustomize), validates strictly, and
holds together as one unit: one namespace, every reference resolves, every container sized and
non-root, no duplicate flags, default-deny network policies that still let each Service in."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from facial_r1_pipeline import k8s

REPO_ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = tuple(sorted(p.name for p in (REPO_ROOT / "infra/overlays").iterdir() if p.is_dir()))
NAMESPACE = "facial-r1"
CLUSTER_SCOPED = {
    "Namespace",
    "PriorityClass",
    "ClusterRole",
    "ClusterRoleBinding",
    "StorageClass",
    "PersistentVolume",
    "CustomResourceDefinition",
    "IngressClass",
    "RuntimeClass",
}
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "Pod"}


def render(overlay: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    assert kubectl, (
        "this test renders infra/overlays with `kubectl kustomize` and needs the kubectl binary "
        "on PATH; `make setup` does not install it (no registry package ships a pinned kubectl): "
        "install kubectl from your distribution or the Kubernetes release page, then rerun"
    )
    proc = subprocess.run(
        [kubectl, "kustomize", str(REPO_ROOT / "infra/overlays" / overlay)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request):
    docs = render(request.param)
    assert docs
    return request.param, docs


def external_secrets() -> dict[str, set[str]]:
    """The Secrets infra/README.md tells the user to create: name -> keys (its table)."""
    secrets: dict[str, set[str]] = {}
    for line in (REPO_ROOT / "infra/README.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and re.fullmatch(r"`[a-z0-9-]+`", cells[0]):
            secrets[cells[0].strip("`")] = set(re.findall(r"`([^`]+)`", cells[1]))
    return secrets


def pod_spec(doc: dict) -> dict | None:
    kind = doc["kind"]
    if kind == "Pod":
        return doc["spec"]
    if kind == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    if kind in WORKLOADS:
        return doc["spec"]["template"]["spec"]
    return None


def all_containers(spec: dict) -> list[dict]:
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def flag_names(argv: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in argv if isinstance(a, str) and a.startswith("--")]


def semantic_problems(docs: list[dict]) -> list[str]:
    """Everything that would break a first `kubectl apply -k`, beyond the schema."""
    problems: list[str] = []
    have = {(d["kind"], d["metadata"]["name"]) for d in docs}
    configmaps = {
        d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"
    }
    secrets_ext = external_secrets()
    bound = {
        s["name"]
        for d in docs
        if d["kind"] == "RoleBinding"
        for s in d.get("subjects", [])
        if s.get("kind") == "ServiceAccount"
    }
    sa_automount = {
        d["metadata"]["name"]: d.get("automountServiceAccountToken", True)
        for d in docs
        if d["kind"] == "ServiceAccount"
    }

    def secret_ref(where: str, name: str, key: str | None = None) -> None:
        if ("Secret", name) in have:
            return
        if name not in secrets_ext:
            problems.append(f"{where}: Secret {name} is neither rendered nor in infra/README.md")
        elif key is not None and key not in secrets_ext[name]:
            problems.append(f"{where}: key {key} of Secret {name} is not in infra/README.md")

    def configmap_ref(where: str, name: str, key: str | None = None) -> None:
        if name not in configmaps:
            problems.append(f"{where}: ConfigMap {name} is not in the rendered set")
        elif key is not None and key not in configmaps[name]:
            problems.append(f"{where}: ConfigMap {name} has no key {key}")

    namespaces = [d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"]
    if namespaces != [NAMESPACE]:
        problems.append(f"Namespace objects {namespaces}, expected [{NAMESPACE}]")
    for doc in docs:
        kind, name = doc["kind"], doc["metadata"]["name"]
        where = f"{kind} {name}"
        if kind not in CLUSTER_SCOPED and doc["metadata"].get("namespace") != NAMESPACE:
            problems.append(f"{where}: namespace {doc['metadata'].get('namespace')!r}")
        if kind == "RoleBinding":
            ref = doc["roleRef"]
            if (ref["kind"], ref["name"]) not in have:
                problems.append(f"{where}: roleRef {ref['kind']} {ref['name']} not rendered")
            for sub in doc.get("subjects", []):
                if sub.get("kind") == "ServiceAccount" and (
                    ("ServiceAccount", sub["name"]) not in have or sub.get("namespace") != NAMESPACE
                ):
                    problems.append(f"{where}: subject {sub} does not resolve")
        spec = pod_spec(doc)
        if spec is None:
            continue
        sa = spec.get("serviceAccountName", "default")
        if sa != "default" and ("ServiceAccount", sa) not in have:  # Kubernetes makes default
            problems.append(f"{where}: serviceAccountName {sa} not rendered")
        automount = spec.get("automountServiceAccountToken", sa_automount.get(sa, True))
        if automount and sa not in bound:
            problems.append(f"{where}: mounts a token of {sa}, which no RoleBinding uses")
        psc = spec.get("securityContext") or {}
        for vol in spec.get("volumes", []):
            if "persistentVolumeClaim" in vol:
                claim = vol["persistentVolumeClaim"]["claimName"]
                if ("PersistentVolumeClaim", claim) not in have:
                    problems.append(f"{where}: PVC {claim} not rendered")
            if "configMap" in vol:
                configmap_ref(f"{where} volume", vol["configMap"]["name"])
            if "secret" in vol:
                for item in vol["secret"].get("items") or [{"key": None}]:
                    secret_ref(f"{where} volume", vol["secret"]["secretName"], item["key"])
        mounted = {v["name"] for v in spec.get("volumes", [])}
        for c in all_containers(spec):
            cw = f"{where} container {c['name']}"
            for src in c.get("envFrom", []):
                if "configMapRef" in src:
                    configmap_ref(cw, src["configMapRef"]["name"])
                if "secretRef" in src:
                    secret_ref(cw, src["secretRef"]["name"])
            for env in c.get("env", []):
                ref = env.get("valueFrom", {})
                if "configMapKeyRef" in ref:
                    configmap_ref(cw, ref["configMapKeyRef"]["name"], ref["configMapKeyRef"]["key"])
                if "secretKeyRef" in ref:
                    secret_ref(cw, ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"])
            for m in c.get("volumeMounts", []):
                if m["name"] not in mounted:
                    problems.append(f"{cw}: mounts undeclared volume {m['name']}")
            res = c.get("resources") or {}
            req, lim = res.get("requests") or {}, res.get("limits") or {}
            for what in ("cpu", "memory"):
                if what not in req or what not in lim:
                    problems.append(f"{cw}: needs {what} requests and limits")
            if str(req.get(k8s.GPU)) != str(lim.get(k8s.GPU)):
                problems.append(f"{cw}: GPU requests {req.get(k8s.GPU)} != limits")
            csc = c.get("securityContext") or {}
            if csc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True:
                problems.append(f"{cw}: not runAsNonRoot")
            if csc.get("runAsUser", psc.get("runAsUser")) == 0:
                problems.append(f"{cw}: runs as uid 0")
            if csc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{cw}: allowPrivilegeEscalation must be false")
            # the namespace enforces Pod Security "restricted": the API server would refuse these
            if "ALL" not in (csc.get("capabilities") or {}).get("drop", []):
                problems.append(f"{cw}: must drop ALL capabilities (restricted)")
            seccomp = (csc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
            if seccomp not in ("RuntimeDefault", "Localhost"):
                problems.append(f"{cw}: needs a RuntimeDefault seccomp profile (restricted)")
            flags = flag_names([*c.get("command", []), *c.get("args", [])])
            dups = sorted({f for f in flags if flags.count(f) > 1})
            if dups:
                problems.append(f"{cw}: duplicate flags {dups}")
    problems.extend(network_problems(docs))
    return problems


def _selects(selector: dict, labels: dict) -> bool:
    match = selector.get("matchLabels") or {}
    assert not selector.get("matchExpressions"), "matchExpressions: extend this check"
    return all(labels.get(k) == v for k, v in match.items())


def network_problems(docs: list[dict]) -> list[str]:
    """Default deny both ways, and every Service's pods let in on its target ports."""
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    problems = []
    if not any(
        p["spec"]["podSelector"] == {}
        and set(p["spec"].get("policyTypes", [])) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
        for p in policies
    ):
        problems.append("no default-deny NetworkPolicy (podSelector {}, Ingress + Egress)")
    templates = {}
    for d in docs:
        if d["kind"] in WORKLOADS and d["kind"] != "Pod":
            tpl = d["spec"].get("template") or d["spec"]["jobTemplate"]["spec"]["template"]
            templates[d["metadata"]["name"]] = (tpl["metadata"].get("labels", {}), tpl["spec"])
    for svc in (d for d in docs if d["kind"] == "Service"):
        sel = svc["spec"].get("selector") or {}
        for wname, (labels, spec) in templates.items():
            if not sel or not all(labels.get(k) == v for k, v in sel.items()):
                continue
            named = {
                p["name"]: p["containerPort"]
                for c in spec["containers"]
                for p in c.get("ports", [])
                if "name" in p
            }
            for port in svc["spec"]["ports"]:
                target = port.get("targetPort", port["port"])
                target = named.get(target, target)
                ok = any(
                    "Ingress" in p["spec"].get("policyTypes", [])
                    and _selects(p["spec"]["podSelector"], labels)
                    and any(
                        not rule.get("ports")
                        or any(rp.get("port") == target for rp in rule["ports"])
                        for rule in p["spec"].get("ingress", [])
                    )
                    for p in policies
                )
                if not ok:
                    problems.append(
                        f"Service {svc['metadata']['name']}: no NetworkPolicy lets traffic "
                        f"into {wname} on port {target}"
                    )
    return problems


def _pod_specs(doc):
    kind = doc["kind"]
    if kind in ("Deployment", "Job"):
        return [doc["spec"]["template"]["spec"]]
    if kind == "Pod":
        return [doc["spec"]]
    return []


def test_strict_schema(rendered):
    _, docs = rendered
    for doc in docs:
        assert k8s.validate_strict(doc) == [], (doc["kind"], doc["metadata"]["name"])


def test_workloads_are_pinned_non_root_and_sized(rendered):
    _, docs = rendered
    workloads = [d for d in docs if _pod_specs(d)]
    assert workloads
    for doc in workloads:
        for spec in _pod_specs(doc):
            assert spec["securityContext"]["runAsNonRoot"] is True, doc["metadata"]["name"]
            for c in spec["containers"]:
                assert k8s.image_problem(c["image"]) == "", c["image"]
                res = c["resources"]
                assert res["requests"] and res["limits"]["memory"]
                gpu_req = res["requests"].get(k8s.GPU)
                assert gpu_req == res["limits"].get(k8s.GPU)
                assert c["securityContext"]["allowPrivilegeEscalation"] is False
                for env in c.get("env", []):
                    if k8s.CREDENTIAL_WORDS.search(env["name"]):
                        assert "valueFrom" in env and "value" not in env, env["name"]


def test_overlay_contents(rendered):
    name, docs = rendered
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("PersistentVolumeClaim", "facial-r1-workspace") in kinds
    assert ("Role", "facial-r1-stage-launcher") in kinds
    assert ("Deployment", "mlflow") in kinds and ("Deployment", "airflow-scheduler") in kinds
    if name == "production":
        assert ("ResourceQuota", "facial-r1-gpus") in kinds
        job = next(d for d in docs if d["kind"] == "Job")
        spec = job["spec"]["template"]["spec"]
        assert spec["containers"][0]["resources"]["limits"][k8s.GPU] == "1"
        assert spec["tolerations"] and spec["nodeSelector"]


def test_overlays_hold_together(rendered):
    _, docs = rendered
    assert semantic_problems(docs) == []


def test_every_secret_in_the_readme_is_used():
    used = set()
    for overlay in OVERLAYS:
        for doc in render(overlay):
            text = yaml.safe_dump(doc)
            used |= {n for n in external_secrets() if n in text}
    stage_secrets = {"facial-r1-hf"}  # the profile's resources.secret_env (stage pods)
    assert set(external_secrets()) == used | stage_secrets


def _by_name(docs, kind, name):
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def test_airflow_migrates_first_and_runs_data_steps_in_the_workspace(rendered):
    _, docs = rendered
    sched = pod_spec(_by_name(docs, "Deployment", "airflow-scheduler"))
    init = [c["args"][:2] for c in sched["initContainers"] if c.get("args")]
    assert ["db", "migrate"] in init
    for name in ("airflow-api-server", "airflow-dag-processor", "airflow-triggerer"):
        spec = pod_spec(_by_name(docs, "Deployment", name))
        assert [c["args"][:2] for c in spec["initContainers"]] == [["db", "check-migrations"]]
        # no Kubernetes API access: no token
        assert spec["automountServiceAccountToken"] is False, name
    # the scheduler runs prepare_data / version_data / promote where the stage pods write
    env = {e["name"]: e.get("value") for e in sched["containers"][0]["env"]}
    cm = _by_name(docs, "ConfigMap", sched["containers"][0]["envFrom"][0]["configMapRef"]["name"])
    home = env.get("FACIAL_R1_HOME") or cm["data"]["FACIAL_R1_HOME"]
    mounts = {m["mountPath"]: m["name"] for m in sched["containers"][0]["volumeMounts"]}
    vols = {v["name"]: v for v in sched["volumes"]}
    claim = vols[mounts[home]]["persistentVolumeClaim"]["claimName"]
    assert claim == "facial-r1-workspace"
    # ... as the stage pods' user, so both can write the workspace's files
    assert sched["securityContext"]["runAsUser"] == k8s.KubeSettings.run_as_user


def test_rbac_is_what_the_pod_operators_use(rendered):
    _, docs = rendered
    role = _by_name(docs, "Role", "facial-r1-stage-launcher")
    verbs = {(r, v) for rule in role["rules"] for r in rule["resources"] for v in rule["verbs"]}
    assert ("pods", "create") in verbs and ("jobs", "create") in verbs
    assert ("pods/exec", "create") in verbs  # the XCom sidecar's result is read by exec
    assert not any(r in ("secrets", "configmaps", "roles", "rolebindings") for r, _ in verbs)
    assert not any(v in ("*", "escalate", "bind", "impersonate") for _, v in verbs)
    mounting = [
        d["metadata"]["name"]
        for d in docs
        if pod_spec(d) is not None
        and pod_spec(d).get("serviceAccountName") == "facial-r1-airflow"
        and pod_spec(d).get("automountServiceAccountToken", True)
    ]
    assert mounting == ["airflow-scheduler"]


def test_mlflow_requires_authentication(rendered):
    name, docs = rendered
    mlflow = pod_spec(_by_name(docs, "Deployment", "mlflow"))["containers"][0]
    assert "--app-name=basic-auth" in mlflow["args"]
    env = {e["name"]: e for e in mlflow["env"]}
    for var in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD"):
        assert env[var]["valueFrom"]["secretKeyRef"]["name"] == "facial-r1-mlflow"
    assert "secretKeyRef" in env["MLFLOW_FLASK_SERVER_SECRET_KEY"]["valueFrom"]
    assert "--port=5000" in mlflow["args"] and "--workers=$(MLFLOW_WORKERS)" in mlflow["args"]
    assert env["MLFLOW_WORKERS"]["value"] == ("1" if name == "dev" else "2")


def test_semantic_checks_catch_broken_renders():
    docs = render("production")
    assert semantic_problems(docs) == []
    broken = copy.deepcopy(docs)
    sched = _by_name(broken, "Deployment", "airflow-scheduler")
    del sched["metadata"]["namespace"]
    spec = pod_spec(sched)
    spec["serviceAccountName"] = "nobody"
    spec["initContainers"][0]["resources"] = {}
    spec["containers"][0]["args"] = ["scheduler", "--pid=/tmp/a", "--pid=/tmp/b"]
    spec["containers"][0]["env"].append(
        {"name": "X", "valueFrom": {"secretKeyRef": {"name": "facial-r1-postgres", "key": "nope"}}}
    )
    spec["volumes"][0]["persistentVolumeClaim"]["claimName"] = "missing"
    api = pod_spec(_by_name(broken, "Deployment", "airflow-api-server"))
    api["automountServiceAccountToken"] = True
    api["securityContext"]["runAsNonRoot"] = False
    del api["securityContext"]["seccompProfile"]
    api["containers"][0]["securityContext"]["capabilities"] = {}
    broken = [d for d in broken if d["metadata"]["name"] not in ("default-deny", "airflow")]
    problems = "\n".join(semantic_problems(broken))
    for expected in (
        "Deployment airflow-scheduler: namespace None",
        "serviceAccountName nobody not rendered",
        "container db-migrate: needs cpu requests and limits",
        "duplicate flags ['--pid']",
        "key nope of Secret facial-r1-postgres is not in infra/README.md",
        "PVC missing not rendered",
        "airflow-api-server: mounts a token of facial-r1-airflow-web",
        "container api-server: not runAsNonRoot",
        "container api-server: must drop ALL capabilities",
        "container wait-for-migrations: needs a RuntimeDefault seccomp profile",
        "no default-deny NetworkPolicy",
        "Service airflow-api-server: no NetworkPolicy lets traffic into airflow-api-server",
    ):
        assert expected in problems, expected
