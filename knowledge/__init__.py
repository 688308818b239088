"""Plan data, FAQ and search: what the bot knows about the 2025 merger rollout.

Imports neither aiogram nor handlers: handlers build a KnowledgeBase at start-up and call
``search``/``answer``; the CLI loads the plan with ``load_plan``.
"""

from knowledge.plan import (
    Plan,
    PlanError,
    PlanMilestone,
    PlanSystem,
    export_plan_xlsx,
    import_plan_xlsx,
    load_plan,
    load_plan_file,
    plan_from_db,
)
from knowledge.search import (
    CONFIDENT,
    Entry,
    Hit,
    KnowledgeBase,
    KnowledgeError,
    Vocabulary,
    load_vocabulary,
)

__all__ = [
    "CONFIDENT",
    "Entry",
    "Hit",
    "KnowledgeBase",
    "KnowledgeError",
    "Plan",
    "PlanError",
    "PlanMilestone",
    "PlanSystem",
    "Vocabulary",
    "export_plan_xlsx",
    "import_plan_xlsx",
    "load_plan",
    "load_plan_file",
    "load_vocabulary",
    "plan_from_db",
]
