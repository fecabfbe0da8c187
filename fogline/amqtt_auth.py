"""Logins and the topic ACL for the embedded amqtt broker, from the files Mosquitto reads.

``fogline broker config`` (and the demo) write a Mosquitto password file and
ACL file; the embedded broker reads the same two files and applies the same
rules (``common.broker_auth``), so the two brokers refuse the same things:

- no anonymous clients, wrong passwords refused;
- the client id is the username (Mosquitto's ``use_username_as_clientid``),
  bound *before* amqtt looks up an existing session (see ``bind_identity``);
- subscribe, receive and publish checked against the user's grants, and a
  last will only on a topic the user may write (Mosquitto checks wills too).

Stricter than Mosquitto in one way: a SUBSCRIBE to a filter wider than the
user's read grants is refused (0x80) rather than granted and then filtered,
because amqtt sends retained messages on SUBSCRIBE without a receive check.

NOTE: imported only in the embedded broker's child process (amqtt is a
``cloud`` extra).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import broker_auth
from common.broker_auth import Grant


@dataclass(frozen=True)
class Identities:
    """Who may log in (``$7$`` hashes) and what each may do."""

    hashes: dict[str, str]
    grants: dict[str, list[Grant]]

    @classmethod
    def load(cls, password_file: Path, acl_file: Path) -> Identities:
        return cls(
            broker_auth.parse_password_file(password_file.read_text()),
            broker_auth.parse_acl(acl_file.read_text()),
        )

    def login_ok(self, username: str | None, password: str | None) -> bool:
        encoded = self.hashes.get(username or "")
        return encoded is not None and broker_auth.verify_password(password or "", encoded)


def bind_identity(session: Any, identities: Identities) -> None:
    """Make a CONNECT's client id its username, or a fresh throwaway id if the login is bad.

    amqtt 0.12 takes over, resumes (overwriting its username) or deletes the
    session named by a CONNECT's client id before authenticating the CONNECT;
    so anyone could end the control plane's session by using its client id. Here
    only the owner's credentials reach a session, and a failed login gets a
    clean, random one that authentication then refuses.
    """
    from amqtt.utils import gen_client_id

    if identities.login_ok(session.username, session.password):
        session.client_id = session.username
    else:
        session.client_id = gen_client_id()
        session.clean_session = True


@functools.cache
def auth_plugin_class() -> type:
    """The amqtt plugin (auth + topic checks), built lazily so amqtt loads only in the child."""
    from amqtt.contexts import Action
    from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
    from amqtt.session import Session

    actions: dict[Any, broker_auth.Action] = {
        Action.SUBSCRIBE: "subscribe",
        Action.RECEIVE: "receive",
        Action.PUBLISH: "publish",
    }

    class FoglineAuthPlugin(BaseAuthPlugin, BaseTopicPlugin):
        @dataclass
        class Config:
            password_file: str = ""
            acl_file: str = ""

        def __init__(self, context: Any) -> None:
            super().__init__(context)
            self.identities = Identities.load(
                Path(self.config.password_file), Path(self.config.acl_file)
            )

        async def authenticate(self, *, session: Session) -> bool:
            ids = self.identities
            if session.client_id != session.username or not ids.login_ok(
                session.username, session.password
            ):
                return False
            grants = ids.grants.get(session.username or "", [])
            return not session.will_flag or broker_auth.allowed(
                grants, session.will_topic or "", "publish"
            )

        async def topic_filtering(
            self, *, session: Session | None = None, topic: str | None = None, action: Any = None
        ) -> bool:
            if session is None or topic is None or action not in actions:
                return False
            grants = self.identities.grants.get(session.username or "", [])
            return broker_auth.allowed(grants, topic, actions[action])

    return FoglineAuthPlugin
