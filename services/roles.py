"""Who may do what: the one permission table used by the role middleware, /help and menus."""

from __future__ import annotations

from dataclasses import dataclass

from db.models import Role

ANYONE = "anyone"  # pseudo-role: also unverified people
VERIFIED = frozenset(Role)
APPROVERS = frozenset({Role.unit_admin, Role.dtc_admin})
OPERATORS = frozenset({Role.dtc_admin})
AGENTS = frozenset({Role.support, Role.dtc_admin})


@dataclass(frozen=True)
class Permission:
    name: str
    roles: frozenset[Role] | None  # None = anyone, verified or not
    command: str | None = None  # slash command shown in /help and the menu


PERMISSIONS: dict[str, Permission] = {
    p.name: p
    for p in (
        Permission("start", None, "start"),
        Permission("help", None, "help"),
        Permission("lang", None, "lang"),
        Permission("cancel", None, "cancel"),
        Permission("register", None),
        Permission("me", VERIFIED, "me"),
        Permission("ask", None),
        Permission("status", VERIFIED, "status"),
        Permission("unit", VERIFIED, "unit"),
        Permission("ticket", VERIFIED, "ticket"),
        Permission("mytickets", VERIFIED, "mytickets"),
        Permission("status_update", APPROVERS),
        Permission("approve_registration", APPROVERS, "pending"),
        Permission("overview", OPERATORS, "overview"),
        Permission("report", OPERATORS, "export"),
        Permission("chart", OPERATORS, "chart"),
        Permission("import", OPERATORS, "import"),
        Permission("support", AGENTS),
        Permission("queue", AGENTS, "queue"),
        Permission("ticketstats", OPERATORS, "ticketstats"),
        Permission("supportgroup", OPERATORS, "supportgroup"),
        # provisioning (issue 5)
        Permission("request_account", VERIFIED, "request"),
        Permission("my_requests", VERIFIED, "requests"),
        Permission("approve_provisioning", APPROVERS, "approvals"),
        Permission("catalog", OPERATORS, "catalog"),
        Permission("bulk_provision", OPERATORS, "provision"),
        Permission("broadcast", OPERATORS, "broadcast"),
        Permission("reminders", VERIFIED, "reminders"),
    )
}


def allowed(role: str | Role | None, permission: str) -> bool:
    """True if a person with ``role`` (None = not verified) holds ``permission``."""
    perm = PERMISSIONS[permission]
    if perm.roles is None:
        return True
    return role is not None and Role(role) in perm.roles


def commands_for(role: str | Role | None) -> list[str]:
    """Slash commands a role may use, in menu order."""
    return [p.command for p in PERMISSIONS.values() if p.command and allowed(role, p.name)]
