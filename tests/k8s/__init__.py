"""Kubernetes test harness: a patched kmock API emulator and a test "kubelet" (DESIGN §4).

- `tests.k8s.apiserver.start()` serves a stateful Kubernetes API on 127.0.0.1 (kmock 0.8 plus fixes)
  and writes a kubeconfig for it; the real `kopf`, the official `kubernetes` client and `kubectl`
  talk to it.
- `tests.k8s.kubelet.Kubelet` runs each created Job's container command as a local process and
  writes the Job's and its Pod's status (with the pod's termination message) back to the emulator.
"""
