"""Fixtures of the operator tests; the harness behind them is `testing.operator_harness` and
`testing.fake_kubelet`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from local_mode.processes import free_port
from testing.controlplane import ControlPlane
from testing.fake_kubelet import FakeKubelet
from testing.kubectl import kubectl, unique_name
from testing.operator_harness import (
    OperatorAccount,
    OperatorFactory,
    RestartableMlflow,
    create_namespace,
    install_operator_account,
)


@pytest.fixture(scope="session")
def operator_account(control_plane: ControlPlane, crd_installed: None) -> OperatorAccount:
    return install_operator_account(control_plane)


@pytest.fixture(scope="session")
def operator_mlflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RestartableMlflow]:
    """The operator tests' own MLflow server: unlike the shared one, it may be stopped for a while."""
    mlflow = RestartableMlflow(tmp_path_factory.mktemp("operator-mlflow"), free_port())
    mlflow.start()
    yield mlflow
    mlflow.stop()


@pytest.fixture(scope="session")
def fake_kubelet(control_plane: ControlPlane, operator_mlflow: RestartableMlflow) -> Iterator[FakeKubelet]:
    kubelet = FakeKubelet(control_plane.kubeconfig_path, mlflow_url=operator_mlflow.url).start()
    yield kubelet
    kubelet.stop()


@pytest.fixture
def operators(
    control_plane: ControlPlane,
    operator_account: OperatorAccount,
    operator_mlflow: RestartableMlflow,
    tmp_path: Path,
) -> Iterator[OperatorFactory]:
    factory = OperatorFactory(control_plane, operator_account, operator_mlflow, tmp_path)
    yield factory
    factory.stop_all()
    # Keep the logs of a failing test visible in its report.
    for process in factory.started:
        print(f"--- operator log {process.log_path.name} ---\n{process.log_tail(40)}")


@pytest.fixture
def watched_namespace(
    control_plane: ControlPlane, operator_account: OperatorAccount, fake_kubelet: FakeKubelet
) -> Iterator[str]:
    """A fresh restricted namespace the operator may work in and the fake kubelet runs pods of."""
    namespace = create_namespace(control_plane, unique_name("tr"))
    operator_account.bind_namespace(namespace)
    fake_kubelet.watch(namespace)
    yield namespace
    kubectl(control_plane, "delete", "namespace", namespace, "--wait=false")
