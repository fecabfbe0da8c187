"""The cloud fallback server: ``fogline fallback serve``.

Serves signed model packages over the V2 REST protocol (common.v2_server),
authenticates callers with bearer tokens and sheds load with 503 +
Retry-After. Pinned (``--package``, ``--model``) or following a registry
(``--control``, ``--models PATTERN``, ``--models-dir``): new versions load
beside the serving one and take over once self-tested. Stateless: replicas
behind a load balancer scale it out.

Modules: ``settings`` (flags and environment), ``loading`` (verify, load,
self-test; trusted keys), ``repository`` (loaded versions, what to load),
``sources`` (pinned, control plane, directory), ``follower`` (polls and
loads), ``repository_api`` (the V2 repository extension and its auth),
``server`` (the app, serving, drain).
"""

from cloud.fallback.repository import ModelRepository
from cloud.fallback.server import FALLBACK_REPOSITORY, build_fallback_app, serve
from cloud.fallback.settings import FallbackSettings, read_tokens, register_cli, settings_from_args

__all__ = [
    "FALLBACK_REPOSITORY",
    "FallbackSettings",
    "ModelRepository",
    "build_fallback_app",
    "read_tokens",
    "register_cli",
    "serve",
    "settings_from_args",
]
