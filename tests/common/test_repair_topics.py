"""Red team: repair topics an attacker might send, refused by ``topics.parse``."""

from __future__ import annotations

import pytest

from common import topics

D = "ab" * 32


@pytest.mark.parametrize(
    "topic",
    [
        f"fogline/v1/artifacts/{D}/requests/..",
        f"fogline/v1/artifacts/{D}/requests/+",
        f"fogline/v1/artifacts/{D}/requests/#",
        f"fogline/v1/artifacts/{D}/requests/",
        f"fogline/v1/artifacts/{D.upper()}/requests/dev-1",
        f"fogline/v1/artifacts/{D[:63]}/requests/dev-1",
        f"fogline/v1/artifacts/{D}/requests/dev-1/extra",
        f"fogline/v1/artifacts/{D}/requests",  # the old shared topic
        f"fogline/v1/artifacts/{D}/evil/dev-1",
        f"fogline/v1/artifacts/{D}/requests/{'d' * 65}",
        f"$share/g/fogline/v1/artifacts/{D}/requests/dev-1",
    ],
)
def test_parse_refuses_bad_repair_topics(topic: str) -> None:
    with pytest.raises(ValueError):
        topics.parse(topic)


def test_parse_reads_the_device_from_a_repair_topic() -> None:
    parsed = topics.parse(topics.repair_topic(D, "requests", "dev-1"))
    assert (parsed.ident, parsed.kind, parsed.device) == (D, "requests", "dev-1")
