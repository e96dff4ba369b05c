#!/usr/bin/env bash
# amlserve on an Azure ML managed online endpoint, step by step with the az CLI (`az extension add -n ml`).
# Run from anywhere; README.md explains each step and shows the az commands it runs.
#
#   deploy.sh [--gpu] STEP [ARGS]   --gpu (or AMLSERVE_VARIANT=gpu): the GPU variant of image, create and release
#
#   deploy.sh image                 build docker/Dockerfile (--gpu: Dockerfile.cuda) in the workspace's ACR, tagged with
#                                   the release (az acr build)
#   deploy.sh create                model, environment amlserve-cpu:<release> (--gpu: amlserve-cuda; image by digest),
#                                   endpoint, slot blue at 100%
#   deploy.sh release               the next release beside the live slot: its own environment version, the other slot
#                                   (blue <-> green), 0% traffic, tested through the azureml-model-deployment header
#   deploy.sh shift PERCENT         scale the new slot like the live one, then send it PERCENT% of live traffic
#   deploy.sh promote               100% to the new slot, autoscale moved to it; the old slot stays at 0% for the bake
#   deploy.sh rollback              all traffic back to the other slot (before promote, or during the bake after it)
#   deploy.sh retire                delete the slot at 0% once the bake is over (FORCE=1: now, e.g. a rolled-back release)
#   deploy.sh status                slots, traffic, release of each
#   deploy.sh test [SLOT]           /score, a streamed /v1/chat/completions, /v1/models (optionally pinned to one slot)
#   deploy.sh autoscale [SLOT]      Azure Monitor autoscale for one slot (autoscale.sh; default: the live slot)
#   deploy.sh diagnostics           send console, traffic and event logs and the metrics to a Log Analytics workspace
#   deploy.sh logs [SLOT]           the container's console log
#   deploy.sh delete                delete the endpoint and all its deployments
#
# Env: RESOURCE_GROUP, WORKSPACE (required); ENDPOINT_NAME (amlserve-<user>: unique per region); ACR (the workspace's
#      registry by default); RELEASE (the git commit, 12 hex digits: names the image tag and the environment version;
#      a dirty work tree is refused unless ALLOW_DIRTY=1); BAKE_MINUTES (60: how long the old slot stays at 0% after
#      promote); MODEL_PATH (a .gguf, default SmolLM2); LOG_ANALYTICS_WORKSPACE (diagnostics: name or resource id);
#      AMLSERVE_VARIANT (cpu, or gpu = --gpu: docker/Dockerfile.cuda as image amlserve-cuda:<release>, environment
#      amlserve-cuda from environment-gpu.yml, deployment-gpu.yml); INSTANCE_TYPE (the deployment's SKU instead of
#      the template's, e.g. Standard_NC40ads_H100_v5); ACR_BUILD_TIMEOUT (7200 s: a cold build compiles every crate);
#      APP_INSIGHTS_ID (an Application Insights resource id: create and release give the slot its connection string,
#      so amlserve exports its queue depth there, and autoscale scales on it; see autoscale.sh).
#      The other steps act on slots, whichever variant they run: a GPU release can follow a CPU one, and back.
set -euo pipefail

usage() { sed -n '2,33p' "$0"; exit 2; }
args=()
for a in "$@"; do if [ "$a" = --gpu ]; then AMLSERVE_VARIANT=gpu; else args+=("$a"); fi; done
set -- "${args[@]}"
if [ -z "${1:-}" ] || [ "$1" = -h ] || [ "$1" = --help ]; then usage; fi
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
: "${RESOURCE_GROUP:?set RESOURCE_GROUP}" "${WORKSPACE:?set WORKSPACE}"
ENDPOINT_NAME=${ENDPOINT_NAME:-amlserve-$(whoami | tr -cd 'a-z0-9' | cut -c1-20)}
MODEL_PATH=${MODEL_PATH:-$repo/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
BAKE_MINUTES=${BAKE_MINUTES:-60}
aml=(--resource-group "$RESOURCE_GROUP" --workspace-name "$WORKSPACE")

say() { printf '\n== %s\n' "$*" >&2; }
die() { printf 'deploy.sh: %s\n' "$*" >&2; exit 1; }

# What differs between the variants is only which files and names a release uses; every step below is shared.
# Each variant has its own image repository and environment name, so a commit released on both never collides.
VARIANT=${AMLSERVE_VARIANT:-cpu}
case "$VARIANT" in
  cpu) DOCKERFILE=docker/Dockerfile IMAGE_REPO=amlserve ENVIRONMENT=amlserve-cpu
       ENVIRONMENT_FILE=environment.yml DEPLOYMENT_FILE=deployment.yml ;;
  gpu) DOCKERFILE=docker/Dockerfile.cuda IMAGE_REPO=amlserve-cuda ENVIRONMENT=amlserve-cuda
       ENVIRONMENT_FILE=environment-gpu.yml DEPLOYMENT_FILE=deployment-gpu.yml ;;
  *) die "AMLSERVE_VARIANT must be cpu or gpu, not '$VARIANT'" ;;
esac

# The release identity: the commit the image is built from. Nothing in the YAMLs carries it.
release() {
  if [ -n "${RELEASE:-}" ]; then echo "$RELEASE"; return; fi
  if [ -n "$(git -C "$repo" status --porcelain --untracked-files=no)" ] && [ "${ALLOW_DIRTY:-0}" != 1 ]; then
    die "the work tree has uncommitted changes: commit them (a release is a commit), or set ALLOW_DIRTY=1 or RELEASE"
  fi
  git -C "$repo" rev-parse --short=12 HEAD
}

acr() {
  if [ -n "${ACR:-}" ]; then echo "$ACR"; return; fi
  # the workspace's registry: /subscriptions/.../registries/<name>
  az ml workspace show --name "$WORKSPACE" --resource-group "$RESOURCE_GROUP" --query container_registry -o tsv | awk -F/ '{print $NF}'
}

# The pushed image by digest: a tag can be pushed again, a digest always names the same bytes.
image_by_digest() {
  local tag=$1 registry digest
  registry=$(acr)
  digest=$(az acr repository show --name "$registry" --image "$IMAGE_REPO:$tag" --query digest -o tsv) \
    || die "no image $IMAGE_REPO:$tag in $registry: run deploy.sh image first (variant $VARIANT)"
  echo "$registry.azurecr.io/$IMAGE_REPO@$digest"
}

scoring_uri() { az ml online-endpoint show --name "$ENDPOINT_NAME" "${aml[@]}" --query scoring_uri -o tsv; }
key() { az ml online-endpoint get-credentials --name "$ENDPOINT_NAME" "${aml[@]}" --query primaryKey -o tsv; }
endpoint_tag() { az ml online-endpoint show --name "$ENDPOINT_NAME" "${aml[@]}" --query "tags.$1" -o tsv 2>/dev/null || true; }
traffic_of() { # a slot's share in percent (0 when it has none)
  local t
  t=$(az ml online-endpoint show --name "$ENDPOINT_NAME" "${aml[@]}" --query "traffic.$1" -o tsv)
  echo "${t:-0}"
}
slot_exists() { az ml online-deployment show --name "$1" --endpoint-name "$ENDPOINT_NAME" "${aml[@]}" -o none 2>/dev/null; }
other() { if [ "$1" = blue ]; then echo green; else echo blue; fi; }
instances() { az ml online-deployment show --name "$1" --endpoint-name "$ENDPOINT_NAME" "${aml[@]}" --query instance_count -o tsv; }
# The slot serving traffic now: the endpoint's `live` tag (set by create, promote and rollback).
live() {
  local l
  l=$(endpoint_tag live)
  [ -n "$l" ] || die "endpoint $ENDPOINT_NAME has no 'live' tag: was it made by deploy.sh create?"
  echo "$l"
}

# Registers environment $ENVIRONMENT:<release> (amlserve-cpu or amlserve-cuda) pointing at the release's image digest
# (once; a second call with the same release reuses it, and refuses if it points elsewhere).
register_environment() {
  local rel=$1 img existing
  img=$(image_by_digest "$rel")
  existing=$(az ml environment show --name "$ENVIRONMENT" --version "$rel" "${aml[@]}" --query image -o tsv 2>/dev/null || true)
  if [ -n "$existing" ]; then
    [ "$existing" = "$img" ] || die "environment $ENVIRONMENT:$rel already exists with image $existing, not $img"
    say "environment $ENVIRONMENT:$rel exists ($img)"
    return
  fi
  say "registering environment $ENVIRONMENT:$rel -> $img"
  az ml environment create --file "$here/$ENVIRONMENT_FILE" --version "$rel" --set image="$img" "${aml[@]}" -o none
}

# Sets export_args to the settings of slot SLOT that concern its metrics: its name as the `deployment` resource
# attribute (the dimension the autoscale rules filter on), and with APP_INSIGHTS_ID the connection string of that
# resource, so amlserve exports there (read here; never printed).
export_settings() {
  local slot=$1 cs
  export_args=(--set "environment_variables.OTEL_RESOURCE_ATTRIBUTES=deployment=$slot")
  [ -n "${APP_INSIGHTS_ID:-}" ] || return 0
  cs=$(az resource show --ids "$APP_INSIGHTS_ID" --query properties.ConnectionString -o tsv) \
    || die "cannot read the connection string of APP_INSIGHTS_ID=$APP_INSIGHTS_ID"
  [ -n "$cs" ] || die "APP_INSIGHTS_ID=$APP_INSIGHTS_ID has no connection string: is it an Application Insights resource?"
  export_args+=(--set "environment_variables.APPLICATIONINSIGHTS_CONNECTION_STRING=$cs")
}

# Creates deployment SLOT from the variant's template (deployment.yml, deployment-gpu.yml) with the release's
# environment; extra args go to the create.
create_slot() {
  local slot=$1 rel=$2 sku=() export_args=()
  shift 2
  [ -z "${INSTANCE_TYPE:-}" ] || sku=(--set instance_type="$INSTANCE_TYPE")
  export_settings "$slot"
  say "creating deployment $slot ($VARIANT, release $rel${APP_INSIGHTS_ID:+, metrics to Application Insights};" \
    "waits until its instances are ready)"
  az ml online-deployment create --file "$here/$DEPLOYMENT_FILE" --name "$slot" --endpoint-name "$ENDPOINT_NAME" \
    --set environment="azureml:$ENVIRONMENT:$rel" --set tags.release="$rel" "${sku[@]}" "${export_args[@]}" "$@" \
    "${aml[@]}" -o none
}

set_traffic() {
  say "traffic: $*"
  az ml online-endpoint update --name "$ENDPOINT_NAME" --traffic "$*" "${aml[@]}" -o none
}

set_tags() {
  local args=() kv
  for kv in "$@"; do args+=(--set "tags.$kv"); done
  az ml online-endpoint update --name "$ENDPOINT_NAME" "${args[@]}" "${aml[@]}" -o none
}

# Autoscale follows the traffic: when the slot giving it up has a setting, the slot taking it gets one (from the
# current count) and the old one is deleted, so a slot at 0% is never scaled on metrics that are not its own.
move_autoscale() {
  local to=$1 from=$2
  if ! az monitor autoscale show --resource-group "$RESOURCE_GROUP" --name "autoscale-$ENDPOINT_NAME-$from" -o none 2>/dev/null; then
    say "no autoscale setting on $from (deploy.sh autoscale adds one)"
    return
  fi
  say "autoscale: $from -> $to"
  COUNT=$(instances "$from") ENDPOINT_NAME=$ENDPOINT_NAME DEPLOYMENT_NAME=$to "$here/autoscale.sh"
  az monitor autoscale delete --resource-group "$RESOURCE_GROUP" --name "autoscale-$ENDPOINT_NAME-$from"
}

cmd_image() {
  local rel registry
  rel=$(release)
  registry=$(acr)
  say "building $DOCKERFILE as $registry.azurecr.io/$IMAGE_REPO:$rel in ACR (cloud build; no model baked in)"
  # The build agent needs no GPU: Dockerfile.cuda compiles the kernels for CUDA_COMPUTE_CAP (80) without one.
  az acr build --registry "$registry" --image "$IMAGE_REPO:$rel" --file "$repo/$DOCKERFILE" \
    --timeout "${ACR_BUILD_TIMEOUT:-7200}" \
    --build-arg VCS_REF="$(git -C "$repo" rev-parse HEAD)" --build-arg VERSION="$rel" "$repo"
  say "pushed $(image_by_digest "$rel")"
  # With a local engine instead: docker build -f $DOCKERFILE -t "$registry.azurecr.io/$IMAGE_REPO:$rel" . &&
  #   az acr login -n "$registry" && docker push "$registry.azurecr.io/$IMAGE_REPO:$rel"
}

cmd_create() {
  local rel
  rel=$(release)
  say "registering the model ($MODEL_PATH)"
  az ml model create --file "$here/model.yml" --path "$MODEL_PATH" "${aml[@]}" -o none
  register_environment "$rel"
  say "creating endpoint $ENDPOINT_NAME"
  az ml online-endpoint create --file "$here/endpoint.yml" --name "$ENDPOINT_NAME" "${aml[@]}" -o none
  create_slot blue "$rel" --all-traffic
  set_tags live=blue
  cmd_test blue
}

cmd_release() {
  local rel live_slot slot previous
  rel=$(release)
  live_slot=$(live)
  slot=$(other "$live_slot")
  if slot_exists "$slot"; then
    [ "$(traffic_of "$slot")" = 0 ] || die "$slot still takes traffic: a release is in progress (promote or rollback first)"
    previous=$(endpoint_tag previous)
    [ "$previous" = "$slot" ] || die "$slot exists at 0% (an unpromoted release): deploy.sh rollback or retire it first"
    cmd_retire
  fi
  register_environment "$rel"
  # One instance while it takes test traffic only; shift scales it to the live slot's count.
  create_slot "$slot" "$rel" --set instance_count=1
  cmd_test "$slot"
  say "release $rel is on $slot at 0%; next: deploy.sh shift 10, shift 50, promote"
}

cmd_shift() {
  local pct=${1:?usage: deploy.sh shift PERCENT} live_slot slot count
  if ! [[ "$pct" =~ ^[0-9]+$ ]] || [ "$pct" -gt 100 ]; then die "PERCENT must be 0..100, not '$pct'"; fi
  live_slot=$(live)
  slot=$(other "$live_slot")
  slot_exists "$slot" || die "no $slot deployment: deploy.sh release first"
  count=$(instances "$live_slot")
  say "scaling $slot to $count instances (like $live_slot)"
  az ml online-deployment update --name "$slot" --endpoint-name "$ENDPOINT_NAME" --set instance_count="$count" "${aml[@]}" -o none
  set_traffic "$live_slot=$((100 - pct)) $slot=$pct"
}

cmd_promote() {
  local old new
  old=$(live)
  new=$(other "$old")
  slot_exists "$new" || die "no $new deployment: deploy.sh release first"
  [ "$(instances "$new")" -ge "$(instances "$old")" ] || cmd_shift "$(traffic_of "$new")"
  set_traffic "$old=0 $new=100"
  move_autoscale "$new" "$old"
  set_tags live="$new" previous="$old" promoted_at="$(date +%s)"
  say "$new is live; $old stays at 0% until $(date -d "@$(($(date +%s) + BAKE_MINUTES * 60))" '+%F %T') (deploy.sh rollback until then, deploy.sh retire after)"
}

cmd_rollback() {
  local live_slot slot
  live_slot=$(live)
  slot=$(other "$live_slot")
  slot_exists "$slot" || die "no $slot deployment to roll back to"
  if [ "$(endpoint_tag previous)" = "$slot" ]; then
    # After promote: the old slot is live again, with the autoscale setting.
    set_traffic "$slot=100 $live_slot=0"
    move_autoscale "$slot" "$live_slot"
    set_tags live="$slot" previous="$live_slot" promoted_at="$(date +%s)"
  else
    # Before promote: the new slot loses its share; it stays for inspection until deploy.sh retire.
    set_traffic "$live_slot=100 $slot=0"
  fi
}

cmd_retire() {
  local live_slot slot promoted_at left
  live_slot=$(live)
  slot=$(other "$live_slot")
  slot_exists "$slot" || { say "no $slot deployment to retire"; return; }
  [ "$(traffic_of "$slot")" = 0 ] || die "$slot takes traffic: promote or rollback first"
  if [ "$(endpoint_tag previous)" = "$slot" ] && [ "${FORCE:-0}" != 1 ]; then
    promoted_at=$(endpoint_tag promoted_at)
    left=$(( ${promoted_at:-0} + BAKE_MINUTES * 60 - $(date +%s) ))
    [ "$left" -le 0 ] || die "$slot is the rollback target for $(( (left + 59) / 60 )) more minutes (BAKE_MINUTES=$BAKE_MINUTES; FORCE=1 to retire now)"
  fi
  say "deleting deployment $slot"
  az ml online-deployment delete --name "$slot" --endpoint-name "$ENDPOINT_NAME" --yes "${aml[@]}"
  set_tags previous=
}

cmd_status() {
  az ml online-endpoint show --name "$ENDPOINT_NAME" "${aml[@]}" --query "{traffic: traffic, tags: tags}" -o jsonc
  az ml online-deployment list --endpoint-name "$ENDPOINT_NAME" "${aml[@]}" \
    --query "[].{slot: name, release: tags.release, instances: instance_count, environment: environment, state: provisioning_state}" -o table
}

cmd_test() {
  local deployment=${1:-} uri base k pin=()
  uri=$(scoring_uri); base=${uri%/score}; k=$(key)
  [ -n "$deployment" ] && pin=(-H "azureml-model-deployment: $deployment")
  say "POST $uri ${deployment:+(deployment $deployment)}"
  curl -sS --fail-with-body "$uri" "${pin[@]}" -H "Authorization: Bearer $k" -H 'Content-Type: application/json' -d '{
    "input_data": {"input_string": [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
                   "parameters": {"max_new_tokens": 32, "do_sample": false}}}'
  echo
  say "POST $base/v1/chat/completions (stream)"
  curl -sSN --fail-with-body "$base/v1/chat/completions" "${pin[@]}" -H "Authorization: Bearer $k" \
    -H 'Content-Type: application/json' -d '{
    "messages": [{"role": "user", "content": "Name three colors."}],
    "max_tokens": 32, "stream": true, "stream_options": {"include_usage": true}}'
  say "GET $base/v1/models"
  curl -sS --fail-with-body "$base/v1/models" "${pin[@]}" -H "Authorization: Bearer $k"
  echo
}

# Console logs (AmlOnlineEndpointConsoleLog: amlserve's JSON lines), the gateway's traffic log
# (AmlOnlineEndpointTrafficLog: XRequestId, status, latency per request), events, and the endpoint's platform metrics,
# into a Log Analytics workspace. One setting per endpoint; every deployment under it is covered.
cmd_diagnostics() {
  local law=${LOG_ANALYTICS_WORKSPACE:?set LOG_ANALYTICS_WORKSPACE (a Log Analytics workspace name or resource id)} endpoint_id
  case "$law" in
    /subscriptions/*) ;;
    *) law=$(az monitor log-analytics workspace show --resource-group "$RESOURCE_GROUP" --workspace-name "$law" --query id -o tsv) ;;
  esac
  endpoint_id=$(az ml online-endpoint show --name "$ENDPOINT_NAME" "${aml[@]}" --query id -o tsv)
  say "diagnostic setting amlserve-logs on $ENDPOINT_NAME -> $law"
  az monitor diagnostic-settings create --name amlserve-logs --resource "$endpoint_id" --workspace "$law" \
    --logs '[{"category": "AmlOnlineEndpointConsoleLog", "enabled": true},
             {"category": "AmlOnlineEndpointTrafficLog", "enabled": true},
             {"category": "AmlOnlineEndpointEventLog", "enabled": true}]' \
    --metrics '[{"category": "AllMetrics", "enabled": true}]' -o none
  say "query it (a few minutes later): AmlOnlineEndpointConsoleLog | where DeploymentName == '$(live)' | take 20"
}

cmd_autoscale() { ENDPOINT_NAME=$ENDPOINT_NAME DEPLOYMENT_NAME=${1:-$(live)} "$here/autoscale.sh"; }
cmd_logs() { az ml online-deployment get-logs --name "${1:-$(live)}" --endpoint-name "$ENDPOINT_NAME" --lines 200 "${aml[@]}"; }
cmd_delete() { az ml online-endpoint delete --name "$ENDPOINT_NAME" --yes "${aml[@]}"; }

step=$1
shift
case "$step" in
  image | create | release | shift | promote | rollback | retire | status | test | autoscale | diagnostics | logs | delete)
    "cmd_$step" "$@" ;;
  *) echo "unknown step '$step'" >&2; usage ;;
esac
