"""A long, deterministic prompt: a made-up technical manual, generated, in our own words.

The demo and the benchmark need prompts of thousands of tokens that are the same on
every machine and carry no one else's text. The manual describes a fictional
cold-storage control system; sections vary by index arithmetic (no randomness), so the
text reads as a document rather than one sentence repeated.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

SUBSYSTEMS = (
    "compressor bank", "evaporator loop", "door interlock", "defrost heater", "humidity trap",
    "brine pump", "airflow damper", "ammonia detector", "backup generator", "pallet scanner",
    "floor heating mat", "condenser fan",
)
ACTIONS = (
    "inspect the seals for frost lines", "log the suction pressure every shift",
    "verify that the setpoint matches the zone card", "replace the inlet filter",
    "check the torque on the mounting bolts", "compare the two redundant probes",
    "drain the condensate tray", "confirm the alarm relay clicks when tested",
)
CAUSES = (
    "a door left ajar during loading", "ice bridging across the coil fins", "a failed contactor",
    "a drifting thermistor", "low refrigerant charge", "a blocked return duct",
    "a power dip that restarted the controller", "a misconfigured schedule",
)


def _section(i: int) -> str:
    zone = f"Zone {chr(65 + i % 6)}{i // 6 + 1}"
    part = SUBSYSTEMS[i % len(SUBSYSTEMS)]
    action = ACTIONS[(3 * i + 1) % len(ACTIONS)]
    other = ACTIONS[(5 * i + 4) % len(ACTIONS)]
    cause = CAUSES[(7 * i + 2) % len(CAUSES)]
    setpoint = -30 + (i * 7) % 28
    band = 1 + (i % 3) * 0.5
    interval = 4 + (i * 5) % 20
    limit = 60 + (i * 13) % 90
    return (
        f"Section {i + 1}. The {part} of {zone}.\n"
        f"{zone} holds goods at {setpoint} degrees Celsius with a tolerance band of plus or minus "
        f"{band} degrees. The {part} serving it reports to the supervisory controller every "
        f"{interval} seconds over the plant bus, and the controller keeps the last {limit} readings "
        f"in a ring buffer so that an operator can see the trend before an alarm. "
        f"During the weekly round, {action}, then {other}. Write the result on the zone card and "
        f"initial it; a blank field counts as a missed check at the monthly audit.\n"
        f"When {zone} drifts outside its band for more than {interval * 3} seconds, the most common "
        f"cause is {cause}. Rule that out first before touching the {part}: most false alarms in "
        f"this zone came from it. If the drift continues, switch {zone} to its standby unit, note "
        f"the time, and call the maintenance desk with the zone name, the reading and the section "
        f"number of this manual.\n"
        f"Do not raise the setpoint of {zone} above {setpoint + 4} degrees to silence an alarm. "
        f"Goods stored there lose their certification after {limit} minutes outside the band, and "
        f"the controller records every change with the badge number of the person who made it.\n\n"
    )


def sections() -> Iterator[str]:
    """The manual, one section at a time, without end."""
    yield (
        "Operations Manual for the Halvard Cold Storage Control System\n\n"
        "This manual describes how the control system of the Halvard warehouse keeps each storage "
        "zone at its temperature, which checks the shift operators perform, and what to do when a "
        "reading leaves its band. Every section covers one piece of equipment in one zone.\n\n"
    )
    i = 0
    while True:
        yield _section(i)
        i += 1


def document_ids(tokenizer: Any, num_tokens: int) -> list[int]:
    """The first ``num_tokens`` tokens of the manual (no special tokens)."""
    ids: list[int] = []
    for text in sections():
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) >= num_tokens:
            return ids[:num_tokens]
    raise AssertionError("unreachable: sections() never ends")


QUESTION = "\n\nQuestion: according to the manual, what should an operator do first when a zone drifts?"


def prompt_ids(tokenizer: Any, num_tokens: int, question: str = QUESTION) -> list[int]:
    """A prompt of exactly ``num_tokens`` tokens: the manual, cut to fit, then a question.

    With a chat template, the manual and question are the user's message and the prompt
    ends where the assistant's answer starts.
    """
    marker = "\u2063KVSTACKS_DOCUMENT\u2063"
    head, tail = "", ""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True
        )
        head, _, tail = text.partition(marker)
    head_ids = tokenizer(head, add_special_tokens=False)["input_ids"] if head else []
    tail_ids = tokenizer(question + tail, add_special_tokens=False)["input_ids"]
    room = num_tokens - len(head_ids) - len(tail_ids)
    if room < 1:
        raise ValueError(f"{num_tokens} tokens is too short for a prompt; give at least {num_tokens - room + 1}")
    return head_ids + document_ids(tokenizer, room) + tail_ids
