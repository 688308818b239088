"""The `hopnhat` command line, run as a real process on a fresh SQLite file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def hopnhat(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT),
           "HOPNHAT_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}"}
    env.pop("HOPNHAT_BOT_TOKEN", None)
    return subprocess.run([sys.executable, "-m", "bot", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)


def test_help_lists_the_commands(tmp_path: Path) -> None:
    out = hopnhat(tmp_path, "--help").stdout
    for cmd in ("init", "run", "console", "emulator", "import", "config"):
        assert cmd in out


def test_init_then_import_staff(tmp_path: Path) -> None:
    r = hopnhat(tmp_path, "init")
    assert r.returncode == 0, r.stderr
    assert "Database ready" in r.stdout and "register" in r.stdout
    bad = tmp_path / "bad.csv"
    bad.write_text("full_name,phone,unit_code\nLê Văn A,0912345678,99999\n"
                   "Lê Văn B,0912345679,26743\n", encoding="utf-8")
    r = hopnhat(tmp_path, "import", "staff", str(bad))
    assert r.returncode == 1 and "99999" in r.stdout and "Nothing applied" in r.stdout
    r = hopnhat(tmp_path, "import", "staff", str(bad), "--skip-invalid")
    assert r.returncode == 0 and "Applied" in r.stdout
    r = hopnhat(tmp_path, "import", "staff", str(bad), "--skip-invalid")
    assert "không đổi 1" in r.stdout  # idempotent
    r = hopnhat(tmp_path, "import", "staff", str(tmp_path / "missing.csv"))
    assert r.returncode == 2 and "not found" in r.stderr
    junk = tmp_path / "junk.xlsx"
    junk.write_bytes(b"PK\x03\x04 garbage")
    r = hopnhat(tmp_path, "import", "staff", str(junk))
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_plan_export_edit_import(tmp_path: Path) -> None:
    from openpyxl import load_workbook

    assert hopnhat(tmp_path, "init", "--no-sample").returncode == 0
    xlsx = tmp_path / "plan.xlsx"
    r = hopnhat(tmp_path, "plan", "export", str(xlsx))
    assert r.returncode == 0, r.stderr
    wb = load_workbook(xlsx)
    ws = wb["milestones"]
    header = [c.value for c in ws[1]]
    key_col, due_col = header.index("key"), header.index("due")
    for row in ws.iter_rows(min_row=2):
        if row[key_col].value == "hcm_qlvb_official":
            row[due_col].value = "2025-09-15"
    wb.save(xlsx)
    r = hopnhat(tmp_path, "plan", "import", str(xlsx))
    assert r.returncode == 0 and "Plan applied" in r.stdout, r.stderr
    again = tmp_path / "again.xlsx"
    assert hopnhat(tmp_path, "plan", "export", str(again)).returncode == 0
    dues = {r[key_col].value: r[due_col].value
            for r in load_workbook(again)["milestones"].iter_rows(min_row=2)}
    assert str(dues["hcm_qlvb_official"])[:10] == "2025-09-15"
    for row in ws.iter_rows(min_row=2):
        if row[key_col].value == "hcm_qlvb_official":
            row[due_col].value = "not a date"
    wb.save(xlsx)
    r = hopnhat(tmp_path, "plan", "import", str(xlsx))
    assert r.returncode == 1 and "row" in r.stderr and "Traceback" not in r.stderr
