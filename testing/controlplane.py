"""A real, throw-away Kubernetes control plane for tests: etcd, kube-apiserver, kube-controller-manager.

Everything listens on free loopback ports and lives in one temporary directory. There is no
kubelet, so Pods are admitted, stored and owned by their controllers but never run: that is
enough to exercise admission (PodSecurity), RBAC, garbage collection and every workload
controller against the real API machinery rather than a mock.

The binaries come from ``scripts/build-k8s-tools.sh`` (built once from the Go module proxy and
cached outside the checkout) or from the directory named by ``MNIST_MLOPS_K8S_BIN``.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from local_mode.processes import ChildProcess, ProcessExitedError, free_ports, wait_until

REPO_ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-k8s-tools.sh"
BIN_ENV_VAR = "MNIST_MLOPS_K8S_BIN"
KEEP_ENV_VAR = "MNIST_MLOPS_KEEP_CONTROLPLANE"

# A cold build compiles kube-apiserver from source (about an hour when the 2 cores are shared
# with other heavy work); a warm one answers instantly. CI should run the script before pytest.
BUILD_TIMEOUT_SECONDS = 90 * 60.0
START_TIMEOUT_SECONDS = 120.0
STOP_TIMEOUT_SECONDS = 15.0
HTTP_TIMEOUT_SECONDS = 5.0
POLL_INTERVAL_SECONDS = 0.2

LOOPBACK = "127.0.0.1"
# Only stored in Service objects; no packet is ever sent to these ranges.
SERVICE_CLUSTER_IP_RANGE = "10.96.0.0/16"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"

ADMIN_USER = "mnist-mlops-admin"
CONTROLLER_MANAGER_USER = "system:kube-controller-manager"


class ControlPlaneError(RuntimeError):
    """Start-up or operation of the control plane failed; the message carries the log tail."""


def https_healthz(port: int, address: str = LOOPBACK) -> bool:
    """Whether a component's /healthz answers 200. Components serve it with a certificate they
    signed themselves on start; /healthz is public and holds no secret, so it is not verified."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(
            f"https://{address}:{port}/healthz", context=context, timeout=HTTP_TIMEOUT_SECONDS
        ) as resp:
            return int(resp.status) == 200
    except (urllib.error.URLError, OSError):
        return False


def locate_binaries(timeout: float = BUILD_TIMEOUT_SECONDS) -> Path:
    """The directory holding etcd, kube-apiserver, kube-controller-manager and helm."""
    override = os.environ.get(BIN_ENV_VAR)
    if override:
        bin_dir = Path(override)
    else:
        # The script's stderr is progress chatter; let it reach the terminal so a cold
        # build visibly makes progress instead of looking like a hang.
        proc = subprocess.run(
            ["bash", str(BUILD_SCRIPT)],
            stdout=subprocess.PIPE,
            text=True,
            timeout=timeout,
            check=False,
        )
        if proc.returncode != 0:
            raise ControlPlaneError(f"{BUILD_SCRIPT} failed with exit code {proc.returncode}")
        lines = proc.stdout.strip().splitlines()
        if not lines:
            raise ControlPlaneError(f"{BUILD_SCRIPT} printed no bin directory")
        bin_dir = Path(lines[-1])
    missing = [
        name
        for name in ("etcd", "kube-apiserver", "kube-controller-manager", "helm")
        if not os.access(bin_dir / name, os.X_OK)
    ]
    if missing:
        raise ControlPlaneError(f"{bin_dir} lacks executables: {', '.join(missing)}")
    return bin_dir


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    if proc.returncode != 0:
        raise ControlPlaneError(f"openssl {' '.join(args)} failed:\n{proc.stderr}")


_CLIENT_EXTENSIONS = (
    "basicConstraints=CA:FALSE\n"
    "keyUsage=critical,digitalSignature,keyEncipherment\n"
    "extendedKeyUsage=clientAuth\n"
)


def issue_certificate(
    directory: Path, name: str, subject: str, extensions: str = _CLIENT_EXTENSIONS, issuer: str = "ca"
) -> tuple[Path, Path]:
    """A new EC key and a certificate for it signed by `issuer` (a CA in `directory`); returns
    (certificate, key). EC keys: generating them is instant, unlike RSA, and every component
    accepts them."""
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key", cwd=directory)
    _openssl("req", "-new", "-key", f"{name}.key", "-subj", subject, "-out", f"{name}.csr", cwd=directory)
    (directory / f"{name}.ext").write_text(extensions)
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{issuer}.crt", "-CAkey", f"{issuer}.key",
        "-CAcreateserial", "-days", "2", "-sha256", "-extfile", f"{name}.ext",
        "-out", f"{name}.crt",
        cwd=directory,
    )  # fmt: skip
    return directory / f"{name}.crt", directory / f"{name}.key"


@dataclass(frozen=True)
class Pki:
    """File paths of the keys and certificates of one control plane."""

    ca_cert: Path
    ca_key: Path
    serving_cert: Path
    serving_key: Path
    admin_cert: Path
    admin_key: Path
    kcm_cert: Path
    kcm_key: Path
    sa_key: Path
    sa_pub: Path
    front_proxy_ca_cert: Path
    front_proxy_client_cert: Path
    front_proxy_client_key: Path

    @classmethod
    def generate(cls, directory: Path, serving_ips: Sequence[str] = ()) -> Pki:
        directory.mkdir(parents=True, exist_ok=True)

        def p(name: str) -> Path:
            return directory / name

        # EC keys: generating them is instant, unlike RSA, and every component accepts them.
        def ca(name: str, subject: str) -> None:
            _openssl(
                "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key", cwd=directory
            )  # fmt: skip
            _openssl(
                "req", "-x509", "-new", "-key", f"{name}.key", "-sha256", "-days", "2",
                "-subj", subject, "-out", f"{name}.crt",
                cwd=directory,
            )  # fmt: skip

        def leaf(name: str, subject: str, extensions: str, issuer: str = "ca") -> None:
            issue_certificate(directory, name, subject, extensions, issuer)

        ca("ca", "/CN=mnist-mlops-test-ca")
        leaf(
            "apiserver",
            "/CN=kube-apiserver",
            "basicConstraints=CA:FALSE\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth\n"
            "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,"
            "DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
            + "".join(f",IP:{ip}" for ip in serving_ips)
            + "\n",
        )
        client_ext = _CLIENT_EXTENSIONS
        # O= becomes the group: system:masters bypasses RBAC entirely, as kubeadm's admin.conf.
        leaf("admin", f"/O=system:masters/CN={ADMIN_USER}", client_ext)
        # The identity the default RBAC policy binds to system:kube-controller-manager.
        leaf("kcm", f"/CN={CONTROLLER_MANAGER_USER}", client_ext)
        # The aggregation layer's own CA, separate as in kubeadm: without it every delegating
        # component (the controller-manager too) logs a missing request-header CA forever, and
        # aggregated APIs (APIService objects) could not authenticate the API server.
        ca("front-proxy-ca", "/CN=mnist-mlops-front-proxy-ca")
        leaf("front-proxy-client", "/CN=front-proxy-client", client_ext, issuer="front-proxy-ca")

        # The service-account token signer; RSA because RS256 is what every consumer of
        # projected tokens (and the OIDC discovery document) expects by default.
        _openssl(
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            "sa.key",
            cwd=directory,
        )
        _openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=directory)
        return cls(
            ca_cert=p("ca.crt"),
            ca_key=p("ca.key"),
            serving_cert=p("apiserver.crt"),
            serving_key=p("apiserver.key"),
            admin_cert=p("admin.crt"),
            admin_key=p("admin.key"),
            kcm_cert=p("kcm.crt"),
            kcm_key=p("kcm.key"),
            sa_key=p("sa.key"),
            sa_pub=p("sa.pub"),
            front_proxy_ca_cert=p("front-proxy-ca.crt"),
            front_proxy_client_cert=p("front-proxy-client.crt"),
            front_proxy_client_key=p("front-proxy-client.key"),
        )


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def kubeconfig_document(
    server: str,
    ca_cert: Path,
    user: Mapping[str, Any],
    *,
    cluster_name: str = "mnist-mlops-test",
    user_name: str = "user",
    namespace: str | None = None,
) -> dict[str, Any]:
    """A kubeconfig as a dict; written as JSON, which every kubeconfig loader (YAML) accepts."""
    context: dict[str, Any] = {"cluster": cluster_name, "user": user_name}
    if namespace:
        context["namespace"] = namespace
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": cluster_name,
                "cluster": {"server": server, "certificate-authority-data": _b64(ca_cert)},
            }
        ],
        "users": [{"name": user_name, "user": dict(user)}],
        "contexts": [{"name": cluster_name, "context": context}],
        "current-context": cluster_name,
        "preferences": {},
    }


def _write_private(path: Path, content: str) -> Path:
    # Kubeconfigs hold credentials; tools like helm warn about group/world-readable ones.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(content)
    return path


def serviceaccount_groups(namespace: str) -> list[str]:
    """The groups the API server gives a real token of a ServiceAccount in `namespace`."""
    return ["system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"]


@dataclass
class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager on loopback, in a private temp dir.

    Use :meth:`start` (or the ``control_plane`` pytest fixture) and always :meth:`stop`.
    """

    bin_dir: Path
    root: Path
    # Where the API server listens. Loopback unless pods must reach it (a real node): then the
    # node's bridge address, which the `kubernetes` Service's endpoint points at.
    address: str = LOOPBACK
    # Pods run on a real kubelet: the node controllers run and the API server can reach kubelets.
    with_node: bool = False
    # The API server records every write (who, verb, resource) in an audit log: benchmarks count a
    # client's API writes from it (`write_events`).
    audit_writes: bool = False
    etcd_port: int = 0
    etcd_peer_port: int = 0
    apiserver_port: int = 0
    kcm_port: int = 0
    pki: Pki | None = None
    startup_seconds: float = 0.0
    _processes: list[ChildProcess] = field(default_factory=list)
    _counter: int = 0

    # ----------------------------------------------------------------- lifecycle

    @classmethod
    def start(
        cls,
        bin_dir: Path | None = None,
        parent_dir: Path | None = None,
        timeout: float = START_TIMEOUT_SECONDS,
        attempts: int = 3,
        *,
        address: str = LOOPBACK,
        with_node: bool = False,
        audit_writes: bool = False,
    ) -> ControlPlane:
        """Start all components and wait until the API is usable; raise ControlPlaneError if not.

        Call it from a thread that outlives the control plane (normally the main thread): the
        components get a parent-death signal when the starting thread ends.
        """
        resolved_bin = bin_dir or locate_binaries()
        for attempt in range(1, attempts + 1):
            # A fresh directory per attempt: etcd must never see a previous attempt's data.
            workdir = Path(tempfile.mkdtemp(prefix="mnist-k8s-", dir=parent_dir))
            plane = cls(
                bin_dir=resolved_bin,
                root=workdir,
                address=address,
                with_node=with_node,
                audit_writes=audit_writes,
            )
            try:
                plane._start(timeout)
            except ControlPlaneError as exc:
                plane.stop()
                # A free port can be taken between probing and binding; only that is retried.
                if "address already in use" in str(exc) and attempt < attempts:
                    continue
                raise
            except BaseException:
                plane.stop()
                raise
            return plane
        raise AssertionError("unreachable: the last attempt either returns or raises")

    def _start(self, timeout: float) -> None:
        started = time.monotonic()
        deadline = started + timeout
        self.etcd_port, self.etcd_peer_port, self.apiserver_port, self.kcm_port = free_ports(4)
        self.pki = Pki.generate(self.root / "pki", serving_ips=self._serving_ips())
        _write_private(self.kubeconfig_path, json.dumps(self._admin_kubeconfig(), indent=2))
        _write_private(
            self.root / "kcm.kubeconfig",
            json.dumps(
                kubeconfig_document(
                    self.server_url,
                    self.pki.ca_cert,
                    {
                        "client-certificate": str(self.pki.kcm_cert),
                        "client-key": str(self.pki.kcm_key),
                    },
                ),
                indent=2,
            ),
        )

        etcd = self.spawn("etcd", self._etcd_args())
        self.wait_ready(etcd, self._etcd_healthy, deadline, "etcd /health")
        apiserver = self.spawn("kube-apiserver", self._apiserver_args())
        # /readyz includes the RBAC bootstrap post-start hook, so default roles exist after it.
        self.wait_ready(
            apiserver, lambda: self._api_status("/readyz") == 200, deadline, "kube-apiserver /readyz"
        )
        kcm = self.spawn("kube-controller-manager", self._kcm_args())
        self.wait_ready(kcm, self._kcm_healthy, deadline, "kube-controller-manager /healthz")
        # The serviceaccount controller creating `default` proves the controllers really run.
        self.wait_ready(
            kcm,
            lambda: self._api_status("/api/v1/namespaces/default/serviceaccounts/default") == 200,
            deadline,
            "the default ServiceAccount in namespace default",
        )
        self.startup_seconds = time.monotonic() - started

    def stop(self) -> None:
        """Terminate every component (newest first) and delete the temp dir unless asked to keep it."""
        for proc in reversed(self._processes):
            proc.stop(STOP_TIMEOUT_SECONDS)
        self._processes.clear()
        if not os.environ.get(KEEP_ENV_VAR):
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> ControlPlane:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------- public facts

    @property
    def server_url(self) -> str:
        return f"https://{self.address}:{self.apiserver_port}"

    @property
    def kubeconfig_path(self) -> Path:
        return self.root / "admin.kubeconfig"

    @property
    def ca_cert_path(self) -> Path:
        return self._pki.ca_cert

    @property
    def helm_path(self) -> Path:
        return self.bin_dir / "helm"

    @property
    def log_dir(self) -> Path:
        return self.root / "logs"

    def env(self, kubeconfig: Path | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for a subprocess (kubectl, helm, the operator) talking to this cluster.

        The built tools (helm) come first on PATH, and helm's state lives in the temp dir so that
        tests neither read nor pollute the developer's own helm repositories and caches.
        """
        env = dict(os.environ if base is None else base)
        env["KUBECONFIG"] = str(kubeconfig or self.kubeconfig_path)
        env["PATH"] = os.pathsep.join([str(self.bin_dir), env.get("PATH", "")])
        helm_home = self.root / "helm"
        env["HELM_CACHE_HOME"] = str(helm_home / "cache")
        env["HELM_CONFIG_HOME"] = str(helm_home / "config")
        env["HELM_DATA_HOME"] = str(helm_home / "data")
        return env

    def component_log(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def api_json(self, path: str) -> Any:
        """GET `path` as the admin and decode the JSON body (raises urllib.error.HTTPError)."""
        with urllib.request.urlopen(
            f"{self.server_url}{path}", context=self._ssl_context(), timeout=HTTP_TIMEOUT_SECONDS
        ) as resp:
            return json.loads(resp.read())

    def wait_for_serviceaccount(self, namespace: str, name: str = "default", timeout: float = 60.0) -> None:
        """Wait for a ServiceAccount: pods are rejected until their namespace's account exists,
        and the serviceaccount controller adds `default` only shortly after the namespace."""
        wait_until(
            lambda: self._api_status(f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}") == 200,
            timeout,
            f"ServiceAccount {namespace}/{name}",
        )

    # ----------------------------------------------------------------- other identities

    def impersonating_kubeconfig(
        self,
        namespace: str,
        service_account: str,
        path: Path | None = None,
        groups: Sequence[str] | None = None,
    ) -> Path:
        """A kubeconfig acting as ServiceAccount `namespace/service_account` through impersonation.

        The admin's client certificate is in the file and only the ``as`` fields narrow it down.
        kubectl, helm and client-go honour them, but the Python ``kubernetes`` client (and so
        kopf) silently ignores them and runs as cluster-admin (checked against 37.0.2), so give
        Python processes under test :meth:`serviceaccount_kubeconfig` instead.
        The ServiceAccount need not exist.
        """
        user = {
            "client-certificate-data": _b64(self._pki.admin_cert),
            "client-key-data": _b64(self._pki.admin_key),
            "as": f"system:serviceaccount:{namespace}:{service_account}",
            "as-groups": list(groups if groups is not None else serviceaccount_groups(namespace)),
        }
        target = path or self._new_path(f"as-{namespace}-{service_account}.kubeconfig")
        doc = kubeconfig_document(self.server_url, self._pki.ca_cert, user, namespace=namespace)
        return _write_private(target, json.dumps(doc, indent=2))

    def serviceaccount_kubeconfig(
        self,
        namespace: str,
        service_account: str,
        path: Path | None = None,
        expiration_seconds: int = 3600,
    ) -> Path:
        """A kubeconfig holding a real bound token of an existing ServiceAccount (TokenRequest API).

        Unlike impersonation it carries no admin credential at all, so whatever client reads it
        gets exactly the ServiceAccount's RBAC permissions, as a Pod using that account would.
        """
        body = json.dumps(
            {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {"expirationSeconds": expiration_seconds},
            }
        ).encode()
        request = urllib.request.Request(
            f"{self.server_url}/api/v1/namespaces/{namespace}/serviceaccounts/{service_account}/token",
            data=body,
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(
                request, context=self._ssl_context(), timeout=HTTP_TIMEOUT_SECONDS
            ) as resp:
                token = str(json.loads(resp.read())["status"]["token"])
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            raise ControlPlaneError(
                f"TokenRequest for {namespace}/{service_account} failed: {exc.code} {detail}"
            ) from exc
        target = path or self._new_path(f"sa-{namespace}-{service_account}.kubeconfig")
        doc = kubeconfig_document(self.server_url, self._pki.ca_cert, {"token": token}, namespace=namespace)
        return _write_private(target, json.dumps(doc, indent=2))

    # ----------------------------------------------------------------- internals

    @property
    def _pki(self) -> Pki:
        if self.pki is None:
            raise ControlPlaneError("the control plane has not been started")
        return self.pki

    def _new_path(self, name: str) -> Path:
        self._counter += 1
        directory = self.root / "kubeconfigs"
        directory.mkdir(exist_ok=True)
        return directory / f"{self._counter:03d}-{name}"

    def _admin_kubeconfig(self) -> dict[str, Any]:
        user = {
            "client-certificate-data": _b64(self._pki.admin_cert),
            "client-key-data": _b64(self._pki.admin_key),
        }
        return kubeconfig_document(self.server_url, self._pki.ca_cert, user, user_name=ADMIN_USER)

    def spawn(self, name: str, args: Sequence[str], executable: Path | None = None) -> ChildProcess:
        """Starts a component (a built binary by default) that this control plane stops with itself."""
        proc = ChildProcess.spawn(
            name,
            [str(executable or self.bin_dir / name), *args],
            self.component_log(name),
            cwd=self.root,
            die_with_parent=True,
        )
        self._processes.append(proc)
        return proc

    def wait_ready(self, proc: ChildProcess, ready: Callable[[], bool], deadline: float, what: str) -> None:
        """Waits for one component until the shared start-up deadline, failing with its log tail."""
        try:
            proc.wait_ready(ready, max(deadline - time.monotonic(), 0.0), what, POLL_INTERVAL_SECONDS)
        except (ProcessExitedError, TimeoutError) as exc:
            raise ControlPlaneError(f"{exc}{self._keep_hint()}") from exc

    def _keep_hint(self) -> str:
        if os.environ.get(KEEP_ENV_VAR):
            return f"\n(all logs kept in {self.log_dir})"
        return f"\n(set {KEEP_ENV_VAR}=1 to keep all logs and state after a failure)"

    def _ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self._pki.ca_cert))
        context.load_cert_chain(str(self._pki.admin_cert), str(self._pki.admin_key))
        return context

    def _api_status(self, path: str) -> int:
        try:
            with urllib.request.urlopen(
                f"{self.server_url}{path}", context=self._ssl_context(), timeout=HTTP_TIMEOUT_SECONDS
            ) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except (urllib.error.URLError, OSError):
            return 0

    def _etcd_healthy(self) -> bool:
        try:
            with urllib.request.urlopen(
                f"http://{LOOPBACK}:{self.etcd_port}/health", timeout=HTTP_TIMEOUT_SECONDS
            ) as resp:
                return bool(json.loads(resp.read()).get("health") == "true")
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def _kcm_healthy(self) -> bool:
        return https_healthz(self.kcm_port)

    def _etcd_args(self) -> list[str]:
        client = f"http://{LOOPBACK}:{self.etcd_port}"
        peer = f"http://{LOOPBACK}:{self.etcd_peer_port}"
        return [
            "--name=default",
            f"--data-dir={self.root / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=default={peer}",
            "--initial-cluster-state=new",
            # Test data is disposable; fsync per write would dominate on a small CI disk.
            "--unsafe-no-fsync=true",
            "--log-level=warn",
        ]

    def _apiserver_args(self) -> list[str]:
        pki = self._pki
        return [
            f"--etcd-servers=http://{LOOPBACK}:{self.etcd_port}",
            f"--bind-address={self.address}",
            f"--advertise-address={self.address}",
            f"--secure-port={self.apiserver_port}",
            f"--cert-dir={self.root / 'apiserver-certs'}",
            f"--tls-cert-file={pki.serving_cert}",
            f"--tls-private-key-file={pki.serving_key}",
            f"--client-ca-file={pki.ca_cert}",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={pki.sa_pub}",
            f"--service-account-signing-key-file={pki.sa_key}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            f"--requestheader-client-ca-file={pki.front_proxy_ca_cert}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={pki.front_proxy_client_cert}",
            f"--proxy-client-key-file={pki.front_proxy_client_key}",
            "--authorization-mode=Node,RBAC",
            # Added on top of the default-enabled set (which already holds PodSecurity,
            # ServiceAccount, NamespaceLifecycle, ...); naming PodSecurity documents that the
            # tests depend on it.
            "--enable-admission-plugins=NodeRestriction,PodSecurity",
            # Otherwise the API server itself rejects privileged pods and PodSecurity could
            # never be observed doing so.
            "--allow-privileged=true",
            *self._node_apiserver_args(),
            *self._audit_args(),
            "--profiling=false",
            "--v=1",
        ]

    @property
    def audit_log_path(self) -> Path:
        return self.root / "audit.log"

    def _audit_args(self) -> list[str]:
        if not self.audit_writes:
            return []
        policy = {
            "apiVersion": "audit.k8s.io/v1",
            "kind": "Policy",
            "omitStages": ["RequestReceived"],
            "rules": [
                {"level": "Metadata", "verbs": ["create", "update", "patch", "delete", "deletecollection"]},
                {"level": "None"},
            ],
        }
        policy_path = self.root / "audit-policy.json"
        policy_path.write_text(json.dumps(policy))
        return [
            f"--audit-policy-file={policy_path}",
            f"--audit-log-path={self.audit_log_path}",
            "--audit-log-format=json",
            "--audit-log-maxsize=0",
        ]

    def write_events(self) -> list[dict[str, Any]]:
        """Every completed write the API server has audited so far (start with `audit_writes=True`)."""
        if not self.audit_writes:
            raise ControlPlaneError("the control plane was started without audit_writes=True")
        if not self.audit_log_path.exists():
            return []
        events = [json.loads(line) for line in self.audit_log_path.read_text().splitlines() if line.strip()]
        return [event for event in events if event.get("stage") == "ResponseComplete"]

    def _serving_ips(self) -> list[str]:
        if not self.with_node:
            return []
        # The first address of the service range is the `kubernetes` Service, which pods dial.
        first_service_ip = SERVICE_CLUSTER_IP_RANGE.split("/", maxsplit=1)[0].rsplit(".", 1)[0] + ".1"
        return [self.address, first_service_ip]

    def _node_apiserver_args(self) -> list[str]:
        if not self.with_node:
            # The `kubernetes` Service endpoint would be 127.0.0.1, which Endpoints validation
            # forbids; nothing here routes to it anyway.
            return ["--endpoint-reconciler-type=none"]
        pki = self._pki
        # logs, exec and port-forward go from the API server to the kubelet; the admin identity
        # (system:masters) passes the kubelet's webhook authorization.
        return [
            "--endpoint-reconciler-type=lease",
            f"--kubelet-client-certificate={pki.admin_cert}",
            f"--kubelet-client-key={pki.admin_key}",
            "--kubelet-preferred-address-types=InternalIP",
        ]

    def _kcm_args(self) -> list[str]:
        pki = self._pki
        kubeconfig = self.root / "kcm.kubeconfig"
        return [
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            f"--bind-address={LOOPBACK}",
            f"--secure-port={self.kcm_port}",
            f"--cert-dir={self.root / 'kcm-certs'}",
            # Every controller gets its own ServiceAccount identity, as in kubeadm clusters, so
            # the default RBAC policy (not a superuser) decides what each controller may do.
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={pki.sa_key}",
            f"--root-ca-file={pki.ca_cert}",
            f"--cluster-signing-cert-file={pki.ca_cert}",
            f"--cluster-signing-key-file={pki.ca_key}",
            # There are no nodes: the controllers that only manage nodes stay off (the cloud
            # ones left kube-controller-manager long ago); everything else (garbage collector,
            # job, deployment, replicaset, namespace, serviceaccount, serviceaccount-token, ...)
            # runs as in a real cluster.
            "--controllers=*,-node-ipam-controller"
            + ("" if self.with_node else ",-node-lifecycle-controller"),
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            # A single instance: waiting for a leader lease would only slow start-up.
            "--leader-elect=false",
            "--profiling=false",
            "--v=1",
        ]
