#!/usr/bin/env python3
"""A fake `gcloud` for tests/test_launch.py: plays a TPU slice's life from a scenario, records calls.

$FAKE_GCLOUD_DIR holds scenario.json, state.json (the slice now) and calls.jsonl (one call a line).
scenario: {"boot": describes that answer CREATING after a create, "workers": hosts per slice,
"runs": [{"after": describes after a training start,
          "then": "preempt" | "delete" | "unhealthy" | "exit N" | "done"}]}
The i-th training start meets runs[i]; once the runs are used up, training keeps running.
"""

import json
import os
import sys
from pathlib import Path

DIR = Path(os.environ["FAKE_GCLOUD_DIR"])


def main(args: list[str]) -> int:
    with open(DIR / "calls.jsonl", "a") as f:
        f.write(json.dumps(args) + "\n")
    scenario = json.loads((DIR / "scenario.json").read_text())
    state_file = DIR / "state.json"
    st = json.loads(state_file.read_text()) if state_file.exists() else {
        "exists": False, "state": "", "creating": 0, "run": -1, "polls": 0, "rc": None, "done": False}
    try:
        return handle(args, scenario, st)
    finally:
        state_file.write_text(json.dumps(st))


def handle(args: list[str], scenario: dict, st: dict) -> int:
    queued = args[:3] == ["compute", "tpus", "queued-resources"]
    verb = args[3] if len(args) > 3 else ""
    if args[:3] == ["storage", "objects", "describe"]:
        if st["done"]:
            print(args[3])
            return 0
        print("ERROR: (gcloud.storage.objects.describe) NOT_FOUND", file=sys.stderr)
        return 1
    if verb == "create":
        if st["exists"]:
            print("ERROR: ALREADY_EXISTS", file=sys.stderr)
            return 1
        st.update(exists=True, state="CREATING", creating=scenario.get("boot", 1), health="HEALTHY")
        return 0
    if verb == "delete":
        st.update(exists=False, state="")
        return 0
    if verb == "describe":
        if st["exists"] and st["state"] == "CREATING":
            st["creating"] -= 1
            if st["creating"] < 0:
                st["state"] = "READY"
        elif st["run"] >= 0 and st["run"] < len(scenario["runs"]):
            st["polls"] += 1
            event = scenario["runs"][st["run"]]
            if st["polls"] == event["after"]:
                then = event["then"]
                if then == "preempt":
                    st["state"] = "SUSPENDED" if queued else "PREEMPTED"
                elif then == "delete":
                    st.update(exists=False, state="")
                elif then == "unhealthy":  # READY, but a host is under maintenance
                    st["health"] = "UNHEALTHY_MAINTENANCE"
                elif then.startswith("exit "):
                    st["rc"] = int(then.split()[1])
                elif then == "done":
                    st.update(done=True, rc=0)
        if not st["exists"]:
            print("ERROR: (gcloud.compute.tpus.describe) NOT_FOUND: resource not found", file=sys.stderr)
            return 1
        if queued:
            state = {"READY": "ACTIVE", "CREATING": "PROVISIONING"}.get(st["state"], st["state"])
            print(json.dumps({"state": {"state": state}}))
        else:
            print(json.dumps({"state": st["state"], "health": st.get("health", "HEALTHY")}))
        return 0
    if verb in ("ssh", "scp"):
        if not st["exists"] or st["state"] != "READY":
            print("ERROR: ssh: connect to host: Connection refused", file=sys.stderr)
            return 255
        command = args[args.index("--command") + 1] if "--command" in args else ""
        if "nanojaxgpt.train" in command and "setsid" in command:
            node, started = args[4], st.setdefault("started", [])
            if not started or node in started:  # a new start (the first of its nodes)
                st.update(run=st["run"] + 1, polls=0, rc=None, started=[node])
            else:  # the same start on the next slice of a multislice resource
                started.append(node)
        elif "rc=" in command:
            for _ in range(scenario.get("workers", 2)):
                print(f"rc={'running' if st['rc'] is None else st['rc']}")
        return 0
    print(f"fake gcloud: unexpected call {args}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
