"""A real single-node Kubernetes cluster from upstream parts, for the end-to-end tier and `make cluster-up`.

On top of :class:`~testing.controlplane.ControlPlane` (etcd, kube-apiserver, kube-controller-manager)
it starts kube-scheduler, a kubelet on containerd (CRI) and runc, pod networking with the CNI
bridge/host-local/portmap/loopback plugins, kube-proxy (iptables) for Services, CoreDNS for cluster
DNS and metrics-server for the HPA. Nothing is imitated: pods run as real containers.

The network is private to this machine: the pods live on the bridge ``mnist0`` (``10.244.0.0/24``)
whose gateway address ``10.244.0.1`` is also the node's address, where the API server, CoreDNS and
metrics-server listen. The Service range ``10.96.0.0/16`` is routed into that bridge too, so no
packet for the cluster ever leaves through another interface.

Needs root, Debian's ``containerd``, ``runc``, ``containernetworking-plugins`` and ``iptables``
(``scripts/install-system-deps.sh``), the binaries of ``scripts/build-k8s-tools.sh`` and the images
of ``scripts/build-images.sh``. containerd keeps its image store under the cache directory, so a
second start finds the images already imported.

Facts this relies on (see the README's "On this machine" section):
- this machine has cgroup v1 only, which kubelet v1.37 refuses unless ``failCgroupV1: false``;
- the sandbox lacks CAP_SYS_RESOURCE: containerd's CRI needs ``restrict_oom_score_adj = true``
  or every pod sandbox fails with "can't get final child's PID from pipe".
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from local_mode.processes import ChildProcess, free_ports
from testing.controlplane import (
    SERVICE_CLUSTER_IP_RANGE,
    ControlPlane,
    ControlPlaneError,
    _write_private,
    https_healthz,
    issue_certificate,
    kubeconfig_document,
    locate_binaries,
)
from testing.kubectl import kubectl_ok

REPO_ROOT = Path(__file__).resolve().parent.parent
IMAGES_SCRIPT = REPO_ROOT / "scripts" / "build-images.sh"
CACHE_ROOT = Path(os.environ.get("MNIST_MLOPS_CACHE", Path.home() / ".cache" / "mnist-mlops"))
NODE_CACHE = CACHE_ROOT / "node"

NODE_NAME = "mnist-node"
BRIDGE = "mnist0"
POD_SUBNET = "10.244.0.0/24"
NODE_IP = "10.244.0.1"
# The conventional kube-dns address: the tenth of the service range.
CLUSTER_DNS_IP = "10.96.0.10"
CLUSTER_DOMAIN = "cluster.local"
CNI_BIN_DIR = Path("/usr/lib/cni")
# Fixed, like the bridge: a containerd restarted after a crash finds the shims of the previous run
# here and can kill them. /run is cleared at boot, as containerd's own state is.
CONTAINERD_STATE = Path("/run/mnist-mlops-node/containerd")
# Rules this harness adds to the host's iptables carry this comment, so stop() finds exactly them.
IPTABLES_COMMENT = "mnist-mlops-node"

NODE_BINARIES = ("kubelet", "kube-scheduler", "kube-proxy", "kubectl", "coredns", "metrics-server")
HOST_TOOLS = ("containerd", "ctr", "runc", "iptables", "ip")

START_TIMEOUT_SECONDS = 240.0
IMAGES_TIMEOUT_SECONDS = 60 * 60.0
CTR_TIMEOUT_SECONDS = 600.0


class NodeError(ControlPlaneError):
    """The node could not be started; the message says which part and carries its log tail."""


def _run(args: list[str], timeout: float = 60.0, check: bool = True, **kwargs: Any) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)
    if check and proc.returncode != 0:
        raise NodeError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr.strip()[-3000:]}")
    return str(proc.stdout)


def _http_ok(url: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return int(resp.status) == 200
    except (urllib.error.URLError, OSError):
        return False


def build_images(import_into: Path | None = None, timeout: float = IMAGES_TIMEOUT_SECONDS) -> dict[str, str]:
    """Runs scripts/build-images.sh (cached by content: seconds when nothing changed) and returns
    its ``name=ref`` lines as a dict: training, serving, operator, mlflow, mlflow_previous, pause."""
    args = ["bash", str(IMAGES_SCRIPT)]
    if import_into is not None:
        args += ["--import-into", str(import_into)]
    # Progress goes to the terminal (stderr) so that a cold build visibly moves.
    proc = subprocess.run(args, stdout=subprocess.PIPE, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise NodeError(f"{IMAGES_SCRIPT} failed with exit code {proc.returncode}")
    refs: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        name, sep, ref = line.strip().partition("=")
        if sep and name.replace("_", "").isalnum() and ":" in ref:
            refs[name] = ref
    missing = {"training", "serving", "operator", "mlflow", "pause"} - refs.keys()
    if missing:
        raise NodeError(f"{IMAGES_SCRIPT} printed no ref for {sorted(missing)}")
    return refs


def missing_prerequisites(bin_dir: Path) -> list[str]:
    """What this machine lacks to run a node, in words a person can act on (empty: all there)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("a real node needs root (network namespaces, iptables, mounts)")
    problems += [f"{tool} is not installed" for tool in HOST_TOOLS if shutil.which(tool) is None]
    problems += [
        f"{CNI_BIN_DIR / plugin} is missing (Debian package containernetworking-plugins)"
        for plugin in ("bridge", "host-local", "loopback", "portmap")
        if not (CNI_BIN_DIR / plugin).exists()
    ]
    problems += [f"{bin_dir / name} is missing" for name in NODE_BINARIES if not (bin_dir / name).exists()]
    return problems


@dataclass
class NodeCluster:
    """A control plane plus one real node. Use :meth:`start` and always :meth:`stop`."""

    plane: ControlPlane
    images: dict[str, str]
    lock_handle: IO[str]
    containerd_socket: Path = Path()
    kubelet_port: int = 0
    metrics_server_port: int = 0
    startup_seconds: float = 0.0
    _kubelet: ChildProcess | None = None

    # ----------------------------------------------------------------- lifecycle

    @classmethod
    def start(cls, timeout: float = START_TIMEOUT_SECONDS, parent_dir: Path | None = None) -> NodeCluster:
        """Builds or reuses the binaries and images, then starts every part and waits until the
        node is Ready, DNS answers and the default ServiceAccount exists."""
        started = time.monotonic()
        bin_dir = locate_binaries()
        problems = missing_prerequisites(bin_dir)
        if problems:
            raise NodeError("cannot start a node here:\n- " + "\n- ".join(problems))
        lock_handle = _take_machine_lock()
        _kill_orphans()
        images = build_images()
        cluster: NodeCluster | None = None
        try:
            _prepare_host_network()
            plane = ControlPlane.start(
                bin_dir=bin_dir, parent_dir=parent_dir, address=NODE_IP, with_node=True
            )
            cluster = cls(plane=plane, images=images, lock_handle=lock_handle)
            cluster._start_node(time.monotonic() + timeout)
        except BaseException:
            if cluster is not None:
                cluster.stop()
            else:
                _release_machine_lock(lock_handle)
            raise
        cluster.startup_seconds = time.monotonic() - started
        return cluster

    def stop(self) -> None:
        """Stops the kubelet, removes every pod's containers and network namespace, stops the
        rest, and takes this harness's routes and iptables rules off the host."""
        try:
            if self._kubelet is not None:
                self._kubelet.stop(timeout=15)
            if self.containerd_socket.exists():
                _remove_all_containers(self.containerd_socket)
            proxy = self.plane.bin_dir / "kube-proxy"
            self.plane.stop()
            # kube-proxy leaves its chains behind on purpose (a restart reuses them); a harness
            # that goes away must not.
            _run([str(proxy), "--cleanup"], check=False)
            _teardown_host_network()
        finally:
            _release_machine_lock(self.lock_handle)

    def __enter__(self) -> NodeCluster:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------- facts and helpers

    @property
    def kubeconfig_path(self) -> Path:
        return self.plane.kubeconfig_path

    @property
    def root(self) -> Path:
        return self.plane.root / "node"

    def env(self) -> dict[str, str]:
        return self.plane.env()

    def kubectl(self, *args: str, input_text: str | None = None, timeout: float = 120.0) -> str:
        """kubectl as the admin that must succeed (testing.kubectl); returns its stdout."""
        return kubectl_ok(self.plane, *args, manifest=input_text, timeout=timeout)

    def apply(self, documents: Sequence[Mapping[str, Any]]) -> None:
        manifest = json.dumps({"apiVersion": "v1", "kind": "List", "items": list(documents)})
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input_text=manifest)

    def get_json(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json"))

    def local_volume(self, name: str, size: str, storage_class: str, owner_uid: int = 10001) -> Path:
        """A `local` PersistentVolume on this node backed by a fresh directory owned by `owner_uid`
        (the kubelet applies fsGroup to local volumes, but a directory a non-root pod can already
        write is what a provisioner would hand out too)."""
        path = self.root / "volumes" / name
        path.mkdir(parents=True, exist_ok=True)
        os.chown(path, owner_uid, owner_uid)
        self.apply(
            [
                {
                    "apiVersion": "v1",
                    "kind": "PersistentVolume",
                    "metadata": {"name": name},
                    "spec": {
                        "capacity": {"storage": size},
                        "accessModes": ["ReadWriteOnce"],
                        "persistentVolumeReclaimPolicy": "Retain",
                        "storageClassName": storage_class,
                        "local": {"path": str(path)},
                        "nodeAffinity": {
                            "required": {
                                "nodeSelectorTerms": [
                                    {
                                        "matchExpressions": [
                                            {
                                                "key": "kubernetes.io/hostname",
                                                "operator": "In",
                                                "values": [NODE_NAME],
                                            }
                                        ]
                                    }
                                ]
                            }
                        },
                    },
                }
            ]
        )
        return path

    # ----------------------------------------------------------------- start-up steps

    def _start_node(self, deadline: float) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        identities = self._issue_identities()
        self._start_containerd(deadline)
        self.images = build_images(import_into=self.containerd_socket)
        self._start_scheduler(identities["kube-scheduler"], deadline)
        # kube-proxy reports healthy only once its Node exists, so the kubelet registers first.
        self._start_kubelet(identities["kubelet"], deadline)
        self._start_proxy(identities["kube-proxy"], deadline)
        self._start_dns(deadline)
        self._start_metrics_server(deadline)
        self.plane.wait_for_serviceaccount("default")

    def _issue_identities(self) -> dict[str, Path]:
        """A kubeconfig per component, each with the identity the default RBAC policy expects."""
        pki_dir = self.plane.ca_cert_path.parent
        subjects = {
            "kubelet": f"/O=system:nodes/CN=system:node:{NODE_NAME}",
            "kube-proxy": "/CN=system:kube-proxy",
            "kube-scheduler": "/CN=system:kube-scheduler",
        }
        kubeconfigs = {}
        for name, subject in subjects.items():
            cert, key = issue_certificate(pki_dir, name, subject)
            doc = kubeconfig_document(
                self.plane.server_url,
                self.plane.ca_cert_path,
                {"client-certificate": str(cert), "client-key": str(key)},
            )
            kubeconfigs[name] = _write_private(self.root / f"{name}.kubeconfig", json.dumps(doc, indent=2))
        return kubeconfigs

    def _start_containerd(self, deadline: float) -> None:
        state = CONTAINERD_STATE
        state.mkdir(parents=True, exist_ok=True)
        self.containerd_socket = state / "containerd.sock"
        store = NODE_CACHE / "containerd"
        store.mkdir(parents=True, exist_ok=True)
        cni_conf = self.root / "cni" / "net.d"
        cni_conf.mkdir(parents=True, exist_ok=True)
        (cni_conf / "10-mnist-mlops.conflist").write_text(json.dumps(self._cni_config(), indent=2))
        config = self.root / "containerd.toml"
        config.write_text(
            _containerd_config(
                store, state, self.containerd_socket, cni_conf, _normalise(self.images["pause"])
            )
        )
        proc = self.plane.spawn("containerd", ["--config", str(config)], executable=_which("containerd"))
        self.plane.wait_ready(
            proc,
            lambda: _run(_ctr(self.containerd_socket, "version"), check=False, timeout=10) != "",
            deadline,
            "containerd's socket",
        )
        # A previous run that was killed outright leaves containers in the persistent store.
        _remove_all_containers(self.containerd_socket)

    def _cni_config(self) -> dict[str, Any]:
        return {
            "cniVersion": "1.0.0",
            "name": "mnist-mlops",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": True,
                    # Pods reach nothing outside this machine, so there is nothing to masquerade.
                    "ipMasq": False,
                    # A pod that calls its own Service is sent back to itself.
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": POD_SUBNET, "gateway": NODE_IP, "rangeStart": "10.244.0.10"}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(self.root / "cni" / "ipam"),
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }

    def _start_scheduler(self, kubeconfig: Path, deadline: float) -> None:
        port = free_ports(1)[0]
        proc = self.plane.spawn(
            "kube-scheduler",
            [
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={port}",
                "--leader-elect=false",
                "--v=1",
            ],
        )
        self.plane.wait_ready(proc, lambda: https_healthz(port), deadline, "kube-scheduler /healthz")

    def _start_proxy(self, kubeconfig: Path, deadline: float) -> None:
        healthz, metrics = free_ports(2)
        config = self.root / "kube-proxy.yaml"
        config.write_text(
            json.dumps(
                {
                    "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
                    "kind": "KubeProxyConfiguration",
                    "clientConnection": {"kubeconfig": str(kubeconfig)},
                    "hostnameOverride": NODE_NAME,
                    "mode": "iptables",
                    "clusterCIDR": POD_SUBNET,
                    "healthzBindAddress": f"127.0.0.1:{healthz}",
                    "metricsBindAddress": f"127.0.0.1:{metrics}",
                    # Only the bridge: NodePorts are not opened on the machine's other interfaces.
                    "nodePortAddresses": [f"{NODE_IP}/32"],
                    # Zero leaves the kernel's conntrack sysctls alone, which this sandbox may
                    # not let a process change.
                    "conntrack": {"maxPerCore": 0, "min": 0},
                }
            )
        )
        proc = self.plane.spawn("kube-proxy", [f"--config={config}", "--v=1"])
        self.plane.wait_ready(
            proc, lambda: _http_ok(f"http://127.0.0.1:{healthz}/healthz"), deadline, "kube-proxy /healthz"
        )

    def _start_dns(self, deadline: float) -> None:
        health, ready = free_ports(2)
        corefile = self.root / "Corefile"
        # No `forward`: nothing outside the cluster is resolvable from here, and an unanswerable
        # upstream would only turn every miss into a timeout instead of NXDOMAIN.
        corefile.write_text(
            f""".:53 {{
    bind {NODE_IP}
    errors
    health 127.0.0.1:{health}
    ready 127.0.0.1:{ready}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {self.plane.kubeconfig_path}
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 5
}}
"""
        )
        proc = self.plane.spawn("coredns", ["-conf", str(corefile)])
        self.plane.wait_ready(
            proc, lambda: _http_ok(f"http://127.0.0.1:{ready}/ready"), deadline, "CoreDNS /ready"
        )
        # The Service pods are pointed at; CoreDNS runs on the node, so its endpoint is the node.
        self.apply(
            _host_service("kube-dns", CLUSTER_DNS_IP, NODE_IP, [("dns", 53, "UDP"), ("dns-tcp", 53, "TCP")])
        )

    def _start_kubelet(self, kubeconfig: Path, deadline: float) -> None:
        self.kubelet_port = free_ports(1, NODE_IP)[0]
        healthz = free_ports(1)[0]
        kubelet_root = self.root / "kubelet"
        kubelet_root.mkdir(parents=True, exist_ok=True)
        config = self.root / "kubelet.yaml"
        config.write_text(json.dumps(self._kubelet_config(healthz), indent=2))
        self._kubelet = self.plane.spawn(
            "kubelet",
            [
                f"--config={config}",
                f"--kubeconfig={kubeconfig}",
                f"--root-dir={kubelet_root}",
                f"--cert-dir={self.root / 'kubelet-pki'}",
                f"--hostname-override={NODE_NAME}",
                f"--node-ip={NODE_IP}",
                "--v=1",
            ],
        )
        self.plane.wait_ready(self._kubelet, self._node_ready, deadline, f"node {NODE_NAME} Ready")

    def _kubelet_config(self, healthz_port: int) -> dict[str, Any]:
        return {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            # This machine has cgroup v1 only; v1.37 refuses it unless told otherwise.
            "failCgroupV1": False,
            "cgroupDriver": "cgroupfs",
            "containerRuntimeEndpoint": f"unix://{self.containerd_socket}",
            "address": NODE_IP,
            "port": self.kubelet_port,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": healthz_port,
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(self.plane.ca_cert_path)},
            },
            "authorization": {"mode": "Webhook"},
            "clusterDomain": CLUSTER_DOMAIN,
            "clusterDNS": [CLUSTER_DNS_IP],
            # Pods must not inherit the machine's resolvers: nothing beyond the cluster answers.
            "resolvConf": "",
            "failSwapOn": False,
            # The disk is shared with the build caches; evicting the platform's pods because
            # image layers fill a large disk past the default 15% would fail tests for nothing.
            "evictionHard": {
                "memory.available": "200Mi",
                "nodefs.available": "2%",
                "imagefs.available": "2%",
            },
            "imageGCHighThresholdPercent": 99,
            "imageGCLowThresholdPercent": 98,
            "serializeImagePulls": False,
            "syncFrequency": "10s",
            "fileCheckFrequency": "10s",
            "nodeStatusReportFrequency": "10s",
            "maxPods": 60,
        }

    def _node_ready(self) -> bool:
        try:
            node = self.plane.api_json(f"/api/v1/nodes/{NODE_NAME}")
        except (OSError, ValueError):
            return False
        conditions = node.get("status", {}).get("conditions", [])
        return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)

    def _start_metrics_server(self, deadline: float) -> None:
        self.metrics_server_port = free_ports(1, NODE_IP)[0]
        kubeconfig = self.plane.kubeconfig_path
        proc = self.plane.spawn(
            "metrics-server",
            [
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                f"--bind-address={NODE_IP}",
                f"--secure-port={self.metrics_server_port}",
                f"--cert-dir={self.root / 'metrics-server-pki'}",
                # The kubelet serves a self-signed certificate (no serving-certificate bootstrap).
                "--kubelet-insecure-tls",
                "--kubelet-preferred-address-types=InternalIP",
                # The kubelet listens on a free port, published in the Node's status, not 10250.
                "--kubelet-use-node-status-port",
                "--metric-resolution=15s",
            ],
        )
        self.plane.wait_ready(
            proc,
            lambda: https_healthz(self.metrics_server_port, NODE_IP),
            deadline,
            "metrics-server /healthz",
        )
        self.apply(
            [
                *_host_service(
                    "metrics-server",
                    None,
                    NODE_IP,
                    [("https", 443, "TCP")],
                    target_port=self.metrics_server_port,
                ),
                {
                    "apiVersion": "apiregistration.k8s.io/v1",
                    "kind": "APIService",
                    "metadata": {"name": "v1beta1.metrics.k8s.io"},
                    "spec": {
                        "group": "metrics.k8s.io",
                        "version": "v1beta1",
                        "groupPriorityMinimum": 100,
                        "versionPriority": 100,
                        # Its certificate is self-signed on start; nothing leaves this machine.
                        "insecureSkipTLSVerify": True,
                        "service": {"name": "metrics-server", "namespace": "kube-system", "port": 443},
                    },
                },
            ]
        )


# --------------------------------------------------------------------- host plumbing


def _which(tool: str) -> Path:
    found = shutil.which(tool)
    if found is None:
        raise NodeError(f"{tool} is not installed")
    return Path(found)


def _ctr(socket_path: Path, *args: str) -> list[str]:
    return ["ctr", "--address", str(socket_path), "--namespace", "k8s.io", *args]


def _normalise(ref: str) -> str:
    """The name containerd stores for a short Docker-style reference."""
    name = ref if "/" in ref.split(":", maxsplit=1)[0] else f"library/{ref}"
    first = name.split("/")[0]
    return name if "." in first or ":" in first or first == "localhost" else f"docker.io/{name}"


def _host_service(
    name: str,
    cluster_ip: str | None,
    address: str,
    ports: list[tuple[str, int, str]],
    target_port: int | None = None,
) -> list[dict[str, Any]]:
    """A selector-less Service in kube-system whose only endpoint is a process on the node."""
    spec: dict[str, Any] = {
        "ports": [
            {"name": port_name, "port": port, "protocol": protocol, "targetPort": target_port or port}
            for port_name, port, protocol in ports
        ]
    }
    if cluster_ip:
        spec["clusterIP"] = cluster_ip
    return [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": "kube-system", "labels": {"k8s-app": name}},
            "spec": spec,
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": f"{name}-node",
                "namespace": "kube-system",
                "labels": {"kubernetes.io/service-name": name},
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": [address], "conditions": {"ready": True}}],
            "ports": [
                {"name": port_name, "port": target_port or port, "protocol": protocol}
                for port_name, port, protocol in ports
            ],
        },
    ]


def _containerd_config(store: Path, state: Path, socket_path: Path, cni_conf: Path, pause_ref: str) -> str:
    return f"""version = 2
root = "{store}"
state = "{state}"

[grpc]
  address = "{socket_path}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause_ref}"
  # The sandbox has no CAP_SYS_RESOURCE: without this every pod sandbox fails to start.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{cni_conf}"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
"""


def _remove_all_containers(socket_path: Path) -> None:
    """Kills and deletes every container of the k8s.io namespace (pods and their sandboxes)."""
    listing = _run(_ctr(socket_path, "containers", "list", "--quiet"), check=False, timeout=30)
    for container in listing.split():
        _run(_ctr(socket_path, "tasks", "kill", "--signal", "SIGKILL", container), check=False, timeout=30)
        _run(_ctr(socket_path, "tasks", "delete", "--force", container), check=False, timeout=30)
        _run(_ctr(socket_path, "containers", "delete", container), check=False, timeout=30)
    # The CRI plugin names each sandbox's network namespace cni-<uuid>; only this harness runs it.
    netns_dir = Path("/var/run/netns")
    if netns_dir.is_dir():
        for netns in netns_dir.glob("cni-*"):
            _run(["ip", "netns", "delete", netns.name], check=False)


def _kill_orphans() -> None:
    """Ends what a run that was killed outright left behind: components re-parented to init that
    served this node's address, and its containerd. Called with the machine lock held, so none of
    them is live. Shims are spared: the next containerd, on the same state directory, reconnects
    to them and removes their containers properly (killing a shim would orphan its container)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        command = b" ".join(args).decode(errors="replace")
        ours = NODE_IP in command or (args[0].endswith(b"containerd") and b"mnist-k8s-" in args[-2])
        if parent == 1 and ours and b"containerd-shim" not in args[0]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(proc.name), signal.SIGKILL)


def _write_sysctl(name: str, value: str) -> None:
    path = Path("/proc/sys") / name.replace(".", "/")
    if path.exists() and path.read_text().strip() != value:
        path.write_text(value)


def _iptables_rules() -> list[list[str]]:
    tag = ["-m", "comment", "--comment", IPTABLES_COMMENT, "-j", "ACCEPT"]
    # dockerd sets the FORWARD policy to DROP; pod-to-Service traffic is forwarded by the node.
    return [["FORWARD", "-i", BRIDGE, *tag], ["FORWARD", "-o", BRIDGE, *tag]]


def _prepare_host_network() -> None:
    _write_sysctl("net.ipv4.ip_forward", "1")
    # Service traffic between two pods on the bridge must pass kube-proxy's iptables rules.
    _write_sysctl("net.bridge.bridge-nf-call-iptables", "1")
    _teardown_host_network()
    _run(["ip", "link", "add", BRIDGE, "type", "bridge"])
    _run(["ip", "addr", "add", f"{NODE_IP}/24", "dev", BRIDGE])
    _run(["ip", "link", "set", BRIDGE, "up"])
    # Service addresses go into the bridge, never out of the machine's other interfaces.
    _run(["ip", "route", "add", SERVICE_CLUSTER_IP_RANGE, "dev", BRIDGE, "src", NODE_IP])
    for rule in _iptables_rules():
        _run(["iptables", "-I", *rule])


def _teardown_host_network() -> None:
    for rule in _iptables_rules():
        # -D removes one copy; a crashed run may have left several.
        for _ in range(10):
            if subprocess.run(["iptables", "-D", *rule], capture_output=True, timeout=10).returncode != 0:
                break
    _run(["ip", "route", "del", SERVICE_CLUSTER_IP_RANGE], check=False)
    _run(["ip", "link", "del", BRIDGE], check=False)


def _take_machine_lock() -> IO[str]:
    """One node per machine: the bridge, its address and port 53 on it are machine-wide."""
    NODE_CACHE.mkdir(parents=True, exist_ok=True)
    handle = (NODE_CACHE / "node.lock").open("w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise NodeError(
            "another node cluster is running on this machine (`make cluster-down` stops the one "
            "`make cluster-up` started)"
        ) from None
    return handle


def _release_machine_lock(handle: IO[str]) -> None:
    with contextlib.suppress(OSError):
        fcntl.flock(handle, fcntl.LOCK_UN)
    handle.close()
