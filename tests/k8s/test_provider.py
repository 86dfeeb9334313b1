"""The Kubernetes provider's readings of pod objects (pure: no cluster needed).

Behaviours covered:
- Ready with a podIP is READY; a pod that ends is LOST when it was ready and FAILED when
  it never was, with the reason: OOMKilled with its memory limit (and oom set), Evicted
  with the kubelet's message, another exit with its reason and code; a deletionTimestamp
  is LOST at once (kubectl delete);
- a pod that will never start says why: Unschedulable -> PlacementError quoting the
  scheduler's message, ErrImagePull/ImagePullBackOff -> PlacementError naming the image,
  a container that ended or cannot be made (CreateContainerConfigError) -> LaunchError;
  a pod still coming up, or one the scheduler is preempting for -> None.
"""

from __future__ import annotations

from typing import Any

import kt
from kt.core.provider import PodState
from kt.k8s.provider import launch_problem, pod_state


def _pod(status: dict[str, Any], **meta: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "p-1",
            "labels": {"kt.dev/pool": "p"},
            "annotations": {"kt.dev/pool-name": "P"},
            **meta,
        },
        "spec": {"containers": [{"name": "kt", "resources": {"limits": {"memory": "400Mi"}}}]},
        "status": status,
    }


def _terminated(reason: str, code: int) -> dict[str, Any]:
    state = {"terminated": {"reason": reason, "exitCode": code}}
    return {"phase": "Failed", "containerStatuses": [{"name": "kt", "state": state}]}


READY = {
    "phase": "Running",
    "podIP": "10.0.0.5",
    "conditions": [{"type": "Ready", "status": "True"}],
}


def test_ready_and_pending() -> None:
    assert pod_state(_pod(READY), was_ready=False) == (PodState.READY, "", False)
    starting = {"phase": "Running", "conditions": [{"type": "Ready", "status": "False"}]}
    assert pod_state(_pod(starting), was_ready=False)[0] is PodState.PENDING
    assert launch_problem(_pod(starting), "img") is None


def test_ends_with_their_reasons() -> None:
    state, reason, oom = pod_state(_pod(_terminated("OOMKilled", 137)), was_ready=True)
    assert (state, oom) == (PodState.LOST, True)
    assert reason == "OOMKilled (memory limit 400Mi), exit code 137"
    evicted = {"phase": "Failed", "reason": "Evicted", "message": "The node was low on memory."}
    assert pod_state(_pod(evicted), was_ready=True) == (
        PodState.LOST,
        "Evicted: The node was low on memory.",
        False,
    )
    state, reason, _ = pod_state(_pod(_terminated("Error", 3)), was_ready=False)
    assert state is PodState.FAILED and reason == "container kt ended (Error, exit code 3)"
    deleted = pod_state(_pod(READY, deletionTimestamp="2026-01-01T00:00:00Z"), was_ready=True)
    assert deleted[0] is PodState.LOST and "being deleted" in deleted[1]


def test_why_a_pod_will_not_start() -> None:
    message = "0/4 nodes are available: 4 Insufficient cpu."
    unschedulable = {
        "phase": "Pending",
        "conditions": [
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": message,
            }
        ],
    }
    error = launch_problem(_pod(unschedulable), "img")
    assert isinstance(error, kt.PlacementError)
    assert message in str(error) and "FailedScheduling" in str(error) and "pool P" in str(error)
    pull = {"waiting": {"reason": "ImagePullBackOff", "message": 'Back-off pulling image "x"'}}
    error = launch_problem(_pod({"phase": "Pending", "containerStatuses": [{"state": pull}]}), "x")
    assert isinstance(error, kt.PlacementError) and "image 'x' cannot be pulled" in str(error)
    error = launch_problem(_pod(_terminated("Error", 3)), "img")
    assert isinstance(error, kt.LaunchError) and "exit code 3" in str(error)
    preempting = {**unschedulable, "nominatedNodeName": "node-2"}  # room is being made
    assert launch_problem(_pod(preempting), "img") is None
    missing = {
        "waiting": {"reason": "CreateContainerConfigError", "message": 'secret "s" not found'}
    }
    error = launch_problem(
        _pod({"phase": "Pending", "containerStatuses": [{"state": missing}]}), "i"
    )
    assert isinstance(error, kt.LaunchError) and 'secret "s" not found' in str(error)
