#!/usr/bin/env bash
# Builds every mnist-mlops container image without a registry, caches each by content, audits the
# Python packages inside, and optionally imports the images into a node's containerd.
#
#   scripts/build-images.sh [--import-into SOCK] [--strict-audit] [--quiet]
#
# --import-into SOCK  also import every image that containerd's k8s.io namespace (the CRI's) lacks,
#                     through the containerd socket SOCK, and point its :dev tag at the current build
# --strict-audit      exit 3 when an image fails the audit's strict verdict: a known vulnerability,
#                     or a direct requirement that could not be audited, that
#                     requirements/audit-ignore.conf does not acknowledge (by default problems are
#                     printed loudly, a vulnerability included, and the build succeeds)
# --quiet             docker build output goes only to the per-image log, not to stderr
#
# stdout ends with one name=ref line per image, in this order: training, serving, operator, mlflow,
# mlflow_previous, pause (e.g. serving=mnist-mlops/serving:<hash>,
# mlflow_previous=mnist-mlops/mlflow:<version>-<hash>); everything else goes to stderr. Each <hash>
# is the first 12 hex digits of a sha256 over the image's inputs (Dockerfile, the files it COPYs as
# .dockerignore admits them, the ids of the base images it builds FROM, build arguments that change
# its content; scripts/dockerfile_inputs.py), so an unchanged image is never rebuilt and a changed one
# never reuses a stale tag. The Python images build FROM two shared bases, mnist-mlops/python-builder
# and mnist-mlops/python-runtime (images/python.Dockerfile), built first on a Debian base and cached
# the same way; a changed base rebuilds them all. Each image but mlflow_previous is also tagged :dev
# (kind, `make deploy`); the MLflow images also carry their MLflow version as a tag. The pause image
# is a pod sandbox image (scripts/pause/pause.c).
#
# The Python packages in each image are listed and audited by scripts/audit_requirements.py --freeze,
# as the requirement sets are (pip-audit, PyPI's latest-release advisories where this index has no
# per-release ones, requirements/audit-ignore.conf); the reports, as text and JSON, go to
# $MNIST_MLOPS_CACHE/image-audits/<image>-<tag>.{txt,json}, kept per tag and redone after
# MNIST_MLOPS_IMAGE_AUDIT_TTL seconds (default a day) or when the audit's code or ignore file change.
#
# Environment: MNIST_MLOPS_CACHE (cache dir, default ~/.cache/mnist-mlops), PYTHON (host python
# for the hashing and pip-audit's virtualenv, default python3), MNIST_MLOPS_CA_BUNDLE (CA bundle put
# in the base image, default /etc/ssl/certs/ca-certificates.crt), MLFLOW_PREVIOUS_VERSION,
# MNIST_MLOPS_BUILD_TIMEOUT (seconds per docker build), MNIST_MLOPS_LOCK_TIMEOUT (seconds to wait
# for a concurrent run), MNIST_MLOPS_IMAGE_AUDIT_TTL. Proxy variables and pip's index settings are
# read from the host at build time and passed as build arguments, so no host name is written into
# the repository. dockerd is started (as root, log in the cache dir) when `docker info` fails.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE_DIR="${MNIST_MLOPS_CACHE:-$HOME/.cache/mnist-mlops}"
PYTHON="${PYTHON:-python3}"
CA_BUNDLE="${MNIST_MLOPS_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
BUILD_TIMEOUT="${MNIST_MLOPS_BUILD_TIMEOUT:-3600}"
LOCK_TIMEOUT="${MNIST_MLOPS_LOCK_TIMEOUT:-7200}"
DOCKERD_START_TIMEOUT=90
IMPORT_TIMEOUT=1800

# The base image: Debian's own Python, so no registry is needed. Bump BASE_RECIPE_REVISION when
# the recipe in build_base changes in a way the package list does not show.
BASE_SUITE=bookworm
BASE_PACKAGES=(python3.11 python3.11-venv python-is-python3 ca-certificates passwd)
BASE_RECIPE_REVISION=1
PAUSE_RECIPE_REVISION=1
PAUSE_CFLAGS=(-static -Os -s -Wall -Wextra -Werror)
# The minor before the pinned one, so an upgrade test sees MLflow migrate a database it created.
MLFLOW_PREVIOUS_VERSION="${MLFLOW_PREVIOUS_VERSION:-3.16.1}"
# Used unless requirements/dev.txt pins pip-audit itself.
PIP_AUDIT_DEFAULT_VERSION=2.10.1
AUDIT_TTL="${MNIST_MLOPS_IMAGE_AUDIT_TTL:-86400}"

IMPORT_SOCK=""
STRICT_AUDIT=0
QUIET=0

log() { printf 'build-images: %s\n' "$*" >&2; }
die() {
    printf 'build-images: error: %s\n' "$*" >&2
    exit 1
}
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

while (($#)); do
    case "$1" in
    --import-into)
        (($# >= 2)) || die "--import-into needs a containerd socket path"
        IMPORT_SOCK="$2"
        shift 2
        ;;
    --import-into=*)
        IMPORT_SOCK="${1#*=}"
        shift
        ;;
    --strict-audit)
        STRICT_AUDIT=1
        shift
        ;;
    --quiet)
        QUIET=1
        shift
        ;;
    -h | --help)
        usage
        exit 0
        ;;
    *)
        usage >&2
        die "unknown argument: $1"
        ;;
    esac
done

need() { command -v "$1" >/dev/null 2>&1 || die "$1 is required ($2)"; }
need docker "the Docker CLI"
need flock "util-linux"
need timeout "coreutils"
need sha256sum "coreutils"
need "$PYTHON" "a host Python 3 for hashing; set PYTHON"
if [[ -n "$IMPORT_SOCK" ]]; then
    need ctr "containerd's CLI, for --import-into"
    [[ -S "$IMPORT_SOCK" ]] || die "--import-into $IMPORT_SOCK is not a socket"
fi
[[ -r "$CA_BUNDLE" ]] || die "CA bundle $CA_BUNDLE is not readable; set MNIST_MLOPS_CA_BUNDLE"

mkdir -p "$CACHE_DIR" "$CACHE_DIR/image-builds" "$CACHE_DIR/image-audits"
# One run at a time per cache: builds of the same tag, the base tarball and dockerd's start would
# otherwise race. Children that outlive the script (dockerd) must not inherit fd 9, or they would
# hold the lock forever.
exec 9>>"$CACHE_DIR/build-images.lock"
if ! flock -n 9; then
    log "another build-images run holds $CACHE_DIR/build-images.lock; waiting up to ${LOCK_TIMEOUT}s"
    flock -w "$LOCK_TIMEOUT" 9 || die "gave up waiting ${LOCK_TIMEOUT}s for $CACHE_DIR/build-images.lock"
fi

START_SECONDS=$SECONDS
export DOCKER_CLI_HINTS=false
# Docker's legacy builder: BuildKit would fetch the `# syntax=` frontend image from a registry.
export DOCKER_BUILDKIT=0

# --- dockerd -------------------------------------------------------------------------------------

docker_answers() { timeout 20 docker info >/dev/null 2>&1; }

ensure_dockerd() {
    docker_answers && return 0
    if [[ -n "${DOCKER_HOST:-}" && "$DOCKER_HOST" != "unix:///var/run/docker.sock" ]]; then
        die "DOCKER_HOST=$DOCKER_HOST does not answer \`docker info\`; start that daemon first"
    fi
    need dockerd "Docker's daemon (Debian package docker.io)"
    [[ "$(id -u)" == 0 ]] || die "dockerd is not running and starting it needs root"
    local dockerd_log="$CACHE_DIR/dockerd.log"
    log "dockerd is not running: starting it (log: $dockerd_log)"
    # setsid: the daemon outlives this script and is not hit by signals sent to its process group.
    setsid dockerd >>"$dockerd_log" 2>&1 </dev/null 9>&- &
    local pid=$! started=$SECONDS
    while ((SECONDS - started < DOCKERD_START_TIMEOUT)); do
        if docker_answers; then
            log "dockerd answers (pid $pid, after $((SECONDS - started))s)"
            return 0
        fi
        # Another run may have started it meanwhile, and ours then exits: only silence is fatal.
        if ! kill -0 "$pid" 2>/dev/null && ! docker_answers; then
            tail -n 20 "$dockerd_log" >&2 || true
            die "dockerd exited before answering; see $dockerd_log"
        fi
        sleep 1
    done
    die "dockerd did not answer \`docker info\` within ${DOCKERD_START_TIMEOUT}s; see $dockerd_log"
}

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }
image_id() { docker image inspect --format '{{.Id}}' "$1"; }
image_size_mb() { docker image inspect --format '{{.Size}}' "$1" | awk '{printf "%.0f", $1 / 1e6}'; }

# --- host settings passed into builds --------------------------------------------------------------

# Proxies are predefined build arguments (every Dockerfile sees them, none stores them in the image);
# pip's index settings go only to the builds that declare them as ARGs: the app images' build stages,
# through the builder base's ONBUILD ARGs (images/python.Dockerfile).
PROXY_BUILD_ARGS=()
declare -A PIP_BUILD_ARGS=()
HOST_ARGS_COLLECTED=0
# Only when something is built: asking pip for its configuration costs a warm run seconds.
collect_host_build_args() {
    ((HOST_ARGS_COLLECTED)) && return 0
    HOST_ARGS_COLLECTED=1
    local name value
    for name in HTTP_PROXY HTTPS_PROXY NO_PROXY ALL_PROXY http_proxy https_proxy no_proxy all_proxy; do
        value="${!name:-}"
        [[ -n "$value" ]] && PROXY_BUILD_ARGS+=(--build-arg "$name=$value")
    done
    for name in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST PIP_DEFAULT_TIMEOUT PIP_PROXY; do
        value="${!name:-}"
        [[ -n "$value" ]] && PIP_BUILD_ARGS[$name]="$value"
    done
    # The same settings from pip's configuration files (pip.conf), where the environment has none.
    local key
    for key in index-url extra-index-url trusted-host timeout proxy; do
        name="PIP_$(tr 'a-z-' 'A-Z_' <<<"$key")"
        [[ "$key" == timeout ]] && name=PIP_DEFAULT_TIMEOUT
        [[ -n "${PIP_BUILD_ARGS[$name]:-}" ]] && continue
        value="$("$PYTHON" -m pip config get "global.$key" 2>/dev/null || true)"
        [[ -n "$value" ]] && PIP_BUILD_ARGS[$name]="$value"
    done
    return 0
}

# host_build_args_for DOCKERFILE...: the host's build arguments a build can use: the proxies, and the
# pip settings that the given Dockerfiles (the image's, and the base's it builds FROM) declare as an ARG
# or ONBUILD ARG.
host_build_args_for() {
    local name
    collect_host_build_args
    HOST_BUILD_ARGS=("${PROXY_BUILD_ARGS[@]}")
    for name in "${!PIP_BUILD_ARGS[@]}"; do
        if grep -qE "^[[:space:]]*(ONBUILD[[:space:]]+)?ARG[[:space:]]+$name([[:space:]=]|$)" "$@"; then
            HOST_BUILD_ARGS+=(--build-arg "$name=${PIP_BUILD_ARGS[$name]}")
        fi
    done
}

# --- content hashes ------------------------------------------------------------------------------

# content_hash DOCKERFILE [EXTRA...]: sha256 (12 hex) over the Dockerfile, every file its COPY
# instructions take from the build context as .dockerignore admits them (path, executable bit, bytes),
# and the extra strings given (scripts/dockerfile_inputs.py, which tests/test_images.py also uses).
content_hash() {
    local dockerfile="$1"
    shift
    "$PYTHON" "$REPO_ROOT/scripts/dockerfile_inputs.py" hash --root "$REPO_ROOT" "$dockerfile" -- "$@" ||
        die "could not hash the inputs of $dockerfile"
}

# --- builds --------------------------------------------------------------------------------------

declare -A REFS=()
declare -A BUILD_SECONDS=()
ORDER=(training serving operator mlflow mlflow_previous pause)

# Runs a docker build with its output in a per-image log (and on stderr unless --quiet).
run_build() {
    local log_file="$1"
    shift
    local status=0
    if ((QUIET)); then
        timeout "$BUILD_TIMEOUT" docker build "$@" >"$log_file" 2>&1 9>&- || status=$?
    else
        timeout "$BUILD_TIMEOUT" docker build "$@" 2>&1 9>&- | tee "$log_file" >&2 || status=$?
    fi
    if ((status != 0)); then
        ((QUIET)) && tail -n 40 "$log_file" >&2
        ((status == 124)) && die "docker build timed out after ${BUILD_TIMEOUT}s; log: $log_file"
        die "docker build failed (exit $status); log: $log_file"
    fi
}

BASE_REF=""
build_base() {
    local ca_hash apt_opts=() proxy
    ca_hash="$(sha256sum <"$CA_BUNDLE" | cut -c1-64)"
    local hash
    hash="$(printf '%s\n' "suite=$BASE_SUITE" "packages=${BASE_PACKAGES[*]}" \
        "recipe=$BASE_RECIPE_REVISION" "ca=$ca_hash" | sha256sum | cut -c1-12)"
    BASE_REF="mnist-mlops/python-base:$hash"
    if image_exists "$BASE_REF"; then
        log "base $BASE_REF: cached"
        return 0
    fi
    need mmdebstrap "to build the Debian base image (Debian package mmdebstrap)"
    [[ "$(id -u)" == 0 ]] || die "building the base image with mmdebstrap needs root"
    # The host's apt proxy, if any, so the chroot's apt reaches the archive the same way.
    for proxy in Acquire::http::Proxy Acquire::https::Proxy; do
        local value
        value="$(apt-config dump "$proxy" 2>/dev/null | sed -n "s/^$proxy \"\(.*\)\";$/\1/p" | head -n 1)"
        [[ -n "$value" ]] && apt_opts+=(--aptopt="$proxy \"$value\"")
    done
    local work="$CACHE_DIR/base-build"
    mkdir -p "$work"
    local tarball="$work/base-$hash.tar" started=$SECONDS
    log "base $BASE_REF: mmdebstrap $BASE_SUITE (${BASE_PACKAGES[*]}), log: $work/base-$hash.log"
    # Docs, man pages and translations are dropped (copyright files kept), as in Docker's slim
    # images. The host's CA bundle replaces Debian's so pip reaches PyPI through the host's egress.
    if ! timeout 1800 mmdebstrap --variant=minbase --mode=root \
        --include="$(
            IFS=,
            echo "${BASE_PACKAGES[*]}"
        )" \
        "${apt_opts[@]}" \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --customize-hook="upload $CA_BUNDLE /etc/ssl/certs/ca-certificates.crt" \
        "$BASE_SUITE" "$tarball" >"$work/base-$hash.log" 2>&1 9>&-; then
        tail -n 30 "$work/base-$hash.log" >&2
        rm -f "$tarball"
        die "mmdebstrap failed; log: $work/base-$hash.log"
    fi
    docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["python3"]' \
        "$tarball" "$BASE_REF" >/dev/null
    rm -f "$tarball"
    BUILD_SECONDS[base]=$((SECONDS - started))
    log "base $BASE_REF: built in ${BUILD_SECONDS[base]}s, $(image_size_mb "$BASE_REF") MB"
}

# The Python bases every app image builds FROM (images/python.Dockerfile): BUILDER_IMAGE, a virtualenv
# to install into, and RUNTIME_IMAGE, the non-root user and environment it runs with. Both are tagged
# by one content hash (that Dockerfile, the helper it copies, the Debian base's id) and also :dev, the
# default the app Dockerfiles name for builds by hand.
PYTHON_BASES_DOCKERFILE=images/python.Dockerfile
BUILDER_REF=""
RUNTIME_REF=""
build_python_bases() {
    local hash target ref started
    hash="$(content_hash "$REPO_ROOT/$PYTHON_BASES_DOCKERFILE" "base=$(image_id "$BASE_REF")")"
    BUILDER_REF="mnist-mlops/python-builder:$hash"
    RUNTIME_REF="mnist-mlops/python-runtime:$hash"
    for target in builder runtime; do
        ref="mnist-mlops/python-$target:$hash"
        if image_exists "$ref"; then
            log "$target base $ref: cached"
        else
            started=$SECONDS
            log "$target base $ref: building $PYTHON_BASES_DOCKERFILE --target $target"
            # No content-hash label: an edit that leaves every instruction as it was (a comment) then
            # gives the same image id from Docker's layer cache, and the app images stay cached.
            run_build "$CACHE_DIR/image-builds/python-$target-$hash.log" -f "$REPO_ROOT/$PYTHON_BASES_DOCKERFILE" \
                --target "$target" --build-arg "PYTHON_IMAGE=$BASE_REF" -t "$ref" "$REPO_ROOT"
            BUILD_SECONDS[python_$target]=$((SECONDS - started))
            log "$target base $ref: built in ${BUILD_SECONDS[python_$target]}s"
        fi
        docker tag "$ref" "mnist-mlops/python-$target:dev"
    done
}

# build_app NAME REPOSITORY DOCKERFILE EXTRA_TAG [--build-arg K=V ...]: content-hashed build FROM the
# Python bases; their ids are part of the hash, so a changed base rebuilds every app image.
build_app() {
    local name="$1" repository="$2" dockerfile="$3" prefix="$4"
    shift 4
    local content_args=("$@") hash
    hash="$(content_hash "$REPO_ROOT/$dockerfile" "builder=$(image_id "$BUILDER_REF")" \
        "runtime=$(image_id "$RUNTIME_REF")" "${content_args[@]}")"
    local ref="$repository:$prefix$hash"
    REFS[$name]="$ref"
    if image_exists "$ref"; then
        log "$name $ref: cached"
        return 0
    fi
    local log_file="$CACHE_DIR/image-builds/$name-$prefix$hash.log" started=$SECONDS
    log "$name $ref: building $dockerfile (log: $log_file)"
    host_build_args_for "$REPO_ROOT/$dockerfile" "$REPO_ROOT/$PYTHON_BASES_DOCKERFILE"
    run_build "$log_file" --network host -f "$REPO_ROOT/$dockerfile" \
        --build-arg "BUILDER_IMAGE=$BUILDER_REF" --build-arg "RUNTIME_IMAGE=$RUNTIME_REF" \
        "${content_args[@]}" "${HOST_BUILD_ARGS[@]}" \
        --label "io.mnist-mlops.content-hash=$hash" -t "$ref" "$REPO_ROOT"
    BUILD_SECONDS[$name]=$((SECONDS - started))
    log "$name $ref: built in ${BUILD_SECONDS[$name]}s, $(image_size_mb "$ref") MB"
}

build_pause() {
    local source="$REPO_ROOT/scripts/pause/pause.c" compiler hash
    # The pause image is FROM scratch: a static binary and nothing else.
    local dockerfile=$'FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n'
    need gcc "to compile the pause program"
    compiler="$(gcc --version | head -n 1)"
    hash="$(
        {
            cat "$source"
            printf '%s\n' "$dockerfile" "cflags=${PAUSE_CFLAGS[*]}" "compiler=$compiler" \
                "recipe=$PAUSE_RECIPE_REVISION"
        } | sha256sum | cut -c1-12
    )"
    local ref="mnist-mlops/pause:$hash"
    REFS[pause]="$ref"
    if image_exists "$ref"; then
        log "pause $ref: cached"
        return 0
    fi
    local work="$CACHE_DIR/pause-build/$hash" started=$SECONDS
    rm -rf "$work"
    mkdir -p "$work"
    gcc "${PAUSE_CFLAGS[@]}" -o "$work/pause" "$source" || die "compiling $source failed"
    printf '%s' "$dockerfile" >"$work/Dockerfile"
    run_build "$CACHE_DIR/image-builds/pause-$hash.log" -t "$ref" "$work"
    BUILD_SECONDS[pause]=$((SECONDS - started))
    log "pause $ref: built in ${BUILD_SECONDS[pause]}s, $(image_size_mb "$ref") MB"
}

# --- audit ---------------------------------------------------------------------------------------

# scripts/audit_requirements.py runs in a virtualenv of its own holding pip-audit, whose
# dependencies (requests, packaging) are all the script needs: the build does not need `make venv`.
AUDIT_PYTHON=""
ensure_audit_python() {
    [[ -n "$AUDIT_PYTHON" ]] && return 0
    local version
    # One pin for the project: requirements/dev.txt's, when it has one.
    version="$(sed -n 's/^pip-audit==\([^ #;]*\).*/\1/p' "$REPO_ROOT/requirements/dev.txt" 2>/dev/null | head -n 1)"
    version="${version:-$PIP_AUDIT_DEFAULT_VERSION}"
    local venv="$CACHE_DIR/pip-audit-$version"
    if [[ ! -f "$venv/.ready" ]]; then
        log "installing pip-audit $version into $venv"
        rm -rf "$venv"
        timeout 120 "$PYTHON" -m venv "$venv" 9>&- || die "could not create $venv"
        timeout 900 "$venv/bin/pip" install --quiet "pip-audit==$version" 9>&- ||
            die "could not install pip-audit $version into $venv"
        touch "$venv/.ready"
    fi
    AUDIT_PYTHON="$venv/bin/python"
}

AUDIT_PROBLEMS=0
AUDIT_UNAUDITABLE=0
# Lists what is installed without pip, so an image that drops pip can still be audited.
LIST_DISTRIBUTIONS='import importlib.metadata as m
print("\n".join(sorted({d.metadata["Name"] + "==" + d.version for d in m.distributions()})))'

# A kept report is reused while it is younger than AUDIT_TTL (advisories appear after an image is
# built, so an old one is redone, not trusted) and than the audit's code and ignore file.
audit_report_is_fresh() {
    local report="$1" input
    [[ -s "$report" ]] || return 1
    (($(date +%s) - $(stat -c %Y "$report") <= AUDIT_TTL)) || return 1
    for input in "$REPO_ROOT/scripts/audit_requirements.py" "$REPO_ROOT/requirements/audit-ignore.conf"; do
        [[ ! -e "$input" || "$report" -nt "$input" ]] || return 1
    done
}

# audit_image NAME REF [AUDIT ARGS...]: audits the Python packages installed in an image with
# scripts/audit_requirements.py --freeze, as the requirement sets are audited (the same advisory
# sources, cache, ignore file and verdict); AUDIT ARGS name its direct requirements. The report is
# kept per tag, so a warm run only reads it.
audit_image() {
    local name="$1" ref="$2"
    shift 2
    local dir="$CACHE_DIR/image-audits"
    local slug="${name//_/-}-${ref##*:}"
    local report="$dir/$slug.json" frozen="$dir/$slug.requirements.txt"
    if ! audit_report_is_fresh "$report"; then
        ensure_audit_python
        if [[ ! -s "$frozen" ]]; then
            if ! timeout 300 docker run --rm --network none --read-only --tmpfs /tmp --cap-drop ALL \
                --entrypoint /opt/venv/bin/python "$ref" -c "$LIST_DISTRIBUTIONS" >"$frozen.tmp" 9>&-; then
                AUDIT_PROBLEMS=$((AUDIT_PROBLEMS + 1))
                log "AUDIT $name $ref: could not list its packages"
                return 0
            fi
            mv "$frozen.tmp" "$frozen"
        fi
        local started=$SECONDS status=0
        rm -f "$report"
        # Exit 1 is a failed verdict, which the report records; only 2 (or none) means no audit.
        timeout 900 "$AUDIT_PYTHON" "$REPO_ROOT/scripts/audit_requirements.py" --freeze "$frozen" \
            --label "$name" "$@" --report "$report" >"$dir/$slug.txt" 2>"$dir/$slug.log" 9>&- || status=$?
        if ((status > 1)) || [[ ! -s "$report" ]]; then
            AUDIT_PROBLEMS=$((AUDIT_PROBLEMS + 1))
            tail -n 5 "$dir/$slug.log" >&2 || true
            log "AUDIT $name $ref: the audit failed (exit $status), no report; see $dir/$slug.log"
            return 0
        fi
        log "audit $name: took $((SECONDS - started))s"
    fi
    local counts failed unauditable transient
    counts="$("$PYTHON" - "$name" "$ref" "$report" "$STRICT_AUDIT" <<'PY'
import json
import sys

name, ref, path, strict = sys.argv[1:5]
with open(path) as f:
    report = json.load(f)
packages = report["packages"]
print(
    f"build-images: audit {name} {ref}: {len(packages)} packages, {report['audited']} audited, "
    f"{report['not_auditable']} not auditable, {report['vulnerabilities']} known vulnerabilities; "
    f"report {path[: -len('.json')]}.txt",
    file=sys.stderr,
)
for package in packages:
    for vuln in package["vulnerabilities"]:
        state = "ignored (audit-ignore.conf)" if vuln["ignored"] else "VULNERABLE"
        fix = ", ".join(vuln["fix_versions"]) or "nothing yet"
        print(f"  {state} {name}: {package['name']} {package['version']}: {vuln['id']} (fixed in {fix})",
              file=sys.stderr)
unaudited = [f"{p['name']}=={p['version']}" for p in packages if not p["audited_by"]]
if unaudited:
    print(f"  not auditable in {name} (the report says why): {', '.join(unaudited)}", file=sys.stderr)
failures = report["strict_failures" if strict == "1" else "failures"]
for failure in failures:
    print(f"  AUDIT {name}: {failure}", file=sys.stderr)
print(len(failures), len(unaudited), report["transient"])
PY
)" || die "could not read the audit report $report"
    read -r failed unauditable transient <<<"$counts"
    AUDIT_PROBLEMS=$((AUDIT_PROBLEMS + failed))
    AUDIT_UNAUDITABLE=$((AUDIT_UNAUDITABLE + unauditable))
    # PyPI did not answer for some packages: the next run asks again rather than keep this for a day.
    ((transient == 0)) || touch -d @0 "$report"
}

# --- containerd import ---------------------------------------------------------------------------

# The CRI normalises `image: mnist-mlops/serving:<tag>` to docker.io/mnist-mlops/serving:<tag>,
# which is also the name `ctr images import` gives a `docker save` of mnist-mlops/serving:<tag>.
import_into_containerd() {
    local sock="$1" existing name ref full started
    existing="$(timeout 60 ctr --address "$sock" -n k8s.io images ls -q 9>&-)" ||
        die "could not list images through $sock"
    for name in "${ORDER[@]}"; do
        ref="${REFS[$name]}"
        full="docker.io/$ref"
        if grep -qxF "$full" <<<"$existing"; then
            log "containerd $sock: $full present"
        else
            started=$SECONDS
            log "containerd $sock: importing $full"
            docker save "$ref" 9>&- |
                timeout "$IMPORT_TIMEOUT" ctr --address "$sock" -n k8s.io images import - >&2 9>&- ||
                die "importing $ref into containerd at $sock failed"
            grep -qxF "$full" <<<"$(ctr --address "$sock" -n k8s.io images ls -q 9>&-)" ||
                die "containerd at $sock does not list $full after importing it"
            log "containerd $sock: imported $full in $((SECONDS - started))s"
        fi
        if [[ "$name" != mlflow_previous ]]; then
            ctr --address "$sock" -n k8s.io images tag --force "$full" "docker.io/${ref%%:*}:dev" >/dev/null 9>&- ||
                die "could not tag $full as :dev in containerd at $sock"
        fi
    done
}

# --- pruning superseded images -------------------------------------------------------------------

# Every source change makes new content tags; without this the machine fills up with old ones (a
# training image is 2.6 GB). Only images of our own repositories go, and only those that no current
# ref or base names: what this run built or found is kept, whatever else is on the machine is not ours.
prune_docker() {
    local keep ref id repo_tag
    declare -A keep=()
    for ref in "${REFS[@]}" "$BASE_REF" "$BUILDER_REF" "$RUNTIME_REF"; do
        id="$(image_id "$ref")" && keep[$id]=1
    done
    while read -r repo_tag id; do
        [[ -n "${keep[$id]:-}" ]] && continue
        log "pruning superseded $repo_tag"
        docker rmi "$repo_tag" >/dev/null 9>&- || log "warning: could not remove $repo_tag (in use?)"
    done < <(docker images --no-trunc --format '{{.Repository}}:{{.Tag}} {{.ID}}' 9>&- |
        awk '$1 ~ /^mnist-mlops\// && $1 !~ /:<none>$/')
}

# The same for the node's containerd: an imported image is a second copy of it.
prune_containerd() {
    local sock="$1" name ref current
    declare -A current=()
    for name in "${ORDER[@]}"; do
        ref="${REFS[$name]}"
        current["docker.io/$ref"]=1
        current["docker.io/${ref%%:*}:dev"]=1
    done
    while read -r name; do
        [[ "$name" == docker.io/mnist-mlops/* && -z "${current[$name]:-}" ]] || continue
        log "containerd $sock: pruning superseded $name"
        ctr --address "$sock" -n k8s.io images rm "$name" >/dev/null 9>&- ||
            log "warning: containerd at $sock could not remove $name"
    done < <(timeout 60 ctr --address "$sock" -n k8s.io images ls -q 9>&-)
}

# --- main ----------------------------------------------------------------------------------------

ensure_dockerd
MLFLOW_VERSION="$(sed -n 's/^mlflow==\([^ #;]*\).*/\1/p' "$REPO_ROOT/requirements/training.txt" | head -n 1)"
[[ -n "$MLFLOW_VERSION" ]] || die "requirements/training.txt does not pin mlflow==<version>"

build_base
build_python_bases
build_app training mnist-mlops/training training_job/Dockerfile ""
build_app serving mnist-mlops/serving serving/Dockerfile ""
build_app operator mnist-mlops/operator operator/Dockerfile ""
build_app mlflow mnist-mlops/mlflow mlflow-server/Dockerfile "" --build-arg "MLFLOW_VERSION=$MLFLOW_VERSION"
build_app mlflow_previous mnist-mlops/mlflow mlflow-server/Dockerfile "$MLFLOW_PREVIOUS_VERSION-" \
    --build-arg "MLFLOW_VERSION=$MLFLOW_PREVIOUS_VERSION"
build_pause

# :dev follows the current tree (kind, skaffold-less deploys); the MLflow images also carry their
# version, which is what an upgrade test names.
for name in training serving operator mlflow pause; do
    docker tag "${REFS[$name]}" "${REFS[$name]%%:*}:dev"
done
docker tag "${REFS[mlflow]}" "mnist-mlops/mlflow:$MLFLOW_VERSION"
docker tag "${REFS[mlflow_previous]}" "mnist-mlops/mlflow:$MLFLOW_PREVIOUS_VERSION"

for name in training serving operator; do
    audit_image "$name" "${REFS[$name]}" --requirement "$REPO_ROOT/requirements/$name.txt"
done
for name in mlflow mlflow_previous; do
    audit_image "$name" "${REFS[$name]}" --requirement "$REPO_ROOT/requirements/mlflow-server.txt" --direct mlflow
done
((AUDIT_UNAUDITABLE == 0)) || log "audit: $AUDIT_UNAUDITABLE packages across the images could not be audited"
if ((AUDIT_PROBLEMS > 0)); then
    log "AUDIT: $AUDIT_PROBLEMS problems across the images (see above)"
    if ((STRICT_AUDIT)); then
        log "error: --strict-audit: failing"
        exit 3
    fi
fi

prune_docker
if [[ -n "$IMPORT_SOCK" ]]; then
    import_into_containerd "$IMPORT_SOCK"
    prune_containerd "$IMPORT_SOCK"
fi

log "done in $((SECONDS - START_SECONDS))s"
for name in "${ORDER[@]}"; do
    printf '%s=%s\n' "$name" "${REFS[$name]}"
done
