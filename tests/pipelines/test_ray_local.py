"""A local Ray instance started by tpr leaves ``~/.ray`` as it found it (#18).

Each case runs ``init_ray`` in a fresh interpreter whose HOME is a temporary folder, so the real
home is never touched and Ray's cached token state starts empty.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

_PROBE = """
import json, os, ray
from ray._raylet import AuthenticationMode, get_authentication_mode
from pipelines.setup import init_ray
init_ray(num_cpus=1)
answer = ray.get(ray.remote(lambda: os.environ.get("RAY_AUTH_TOKEN", ""))
                 .options(num_cpus=0).remote())
token_mode = get_authentication_mode() == AuthenticationMode.TOKEN
ray.shutdown()
print("RESULT " + json.dumps({"token_mode": token_mode, "worker_token": answer,
                              "driver_token": os.environ.get("RAY_AUTH_TOKEN", "")}))
"""


def _probe(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    env.update(HOME=str(home), PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0")
    r = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                       timeout=240, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_local_ray_uses_a_private_token_and_writes_nothing_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    got = _probe(home)
    assert got["token_mode"] is True  # token authentication is on ...
    assert len(got["driver_token"]) == 32 and got["worker_token"] == got["driver_token"]  # ... with our token
    assert not (home / ".ray").exists()  # ... and ~/.ray was never created


def test_a_users_own_token_is_kept(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    token = home / ".ray" / "auth_token"
    token.write_text("f" * 32)
    got = _probe(home)
    assert got["token_mode"] is True
    assert got["driver_token"] == ""  # no private token: Ray reads the user's file
    assert token.read_text() == "f" * 32 and sorted(p.name for p in (home / ".ray").iterdir()) == ["auth_token"]
