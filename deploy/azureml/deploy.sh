#!/usr/bin/env bash
# amlserve on an Azure ML managed online endpoint, step by step with the az CLI (`az extension add -n ml`).
# Run from anywhere; README.md explains each step and shows the az commands it runs.
#
#   deploy.sh image                 build docker/Dockerfile in the workspace's ACR (az acr build; no local docker needed)
#   deploy.sh create                register the model and environment v1, create the endpoint and the blue deployment
#   deploy.sh test [DEPLOYMENT]     /score, a streamed /v1/chat/completions, /v1/models (optionally pinned to one deployment)
#   deploy.sh green                 environment v2 from IMAGE_TAG, green deployment beside blue with 0% traffic, test it
#   deploy.sh shift PERCENT         scale green like blue, then send PERCENT% of live traffic to green
#   deploy.sh promote               100% to green, delete blue
#   deploy.sh rollback              100% back to blue
#   deploy.sh autoscale [DEPLOYMENT] Azure Monitor autoscale rules (autoscale.sh)
#   deploy.sh logs [DEPLOYMENT]     the container's console log
#   deploy.sh delete                delete the endpoint and all its deployments
#
# Env: RESOURCE_GROUP, WORKSPACE (required); ENDPOINT_NAME (amlserve-<user>: unique per region);
#      ACR (the workspace's registry by default); IMAGE_TAG (0.1.0-cpu); MODEL_PATH (a .gguf, default SmolLM2).
set -euo pipefail

if [ -z "${1:-}" ] || [ "$1" = -h ] || [ "$1" = --help ]; then sed -n '2,17p' "$0"; exit 2; fi
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
: "${RESOURCE_GROUP:?set RESOURCE_GROUP}" "${WORKSPACE:?set WORKSPACE}"
ENDPOINT_NAME=${ENDPOINT_NAME:-amlserve-$(whoami | tr -cd 'a-z0-9' | cut -c1-20)}
IMAGE_TAG=${IMAGE_TAG:-0.1.0-cpu}
MODEL_PATH=${MODEL_PATH:-$repo/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
aml=(--resource-group "$RESOURCE_GROUP" --workspace-name "$WORKSPACE")

say() { printf '\n== %s\n' "$*" >&2; }

acr() {
  if [ -n "${ACR:-}" ]; then echo "$ACR"; return; fi
  # the workspace's registry: /subscriptions/.../registries/<name>
  az ml workspace show --name "$WORKSPACE" --resource-group "$RESOURCE_GROUP" --query container_registry -o tsv | awk -F/ '{print $NF}'
}
image() { echo "$(acr).azurecr.io/amlserve:$1"; }

scoring_uri() { az ml online-endpoint show --name "$ENDPOINT_NAME" "${aml[@]}" --query scoring_uri -o tsv; }
key() { az ml online-endpoint get-credentials --name "$ENDPOINT_NAME" "${aml[@]}" --query primaryKey -o tsv; }

cmd_image() {
  say "building docker/Dockerfile as $(image "$IMAGE_TAG") in ACR (cloud build)"
  az acr build --registry "$(acr)" --image "amlserve:$IMAGE_TAG" --file "$repo/docker/Dockerfile" "$repo"
  # With a local docker engine instead:
  #   docker build -f docker/Dockerfile -t "$(image "$IMAGE_TAG")" . && az acr login -n "$(acr)" && docker push "$(image "$IMAGE_TAG")"
}

cmd_create() {
  say "registering the model ($MODEL_PATH)"
  az ml model create --file "$here/model.yml" --path "$MODEL_PATH" "${aml[@]}"
  say "registering environment amlserve-cpu:1 -> $(image "$IMAGE_TAG")"
  az ml environment create --file "$here/environment.yml" --version 1 --set image="$(image "$IMAGE_TAG")" "${aml[@]}"
  say "creating endpoint $ENDPOINT_NAME"
  az ml online-endpoint create --file "$here/endpoint.yml" --name "$ENDPOINT_NAME" "${aml[@]}"
  say "creating deployment blue (waits until its instances are ready)"
  az ml online-deployment create --file "$here/deployment.yml" --endpoint-name "$ENDPOINT_NAME" --all-traffic "${aml[@]}"
  cmd_test
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

cmd_green() {
  say "registering environment amlserve-cpu:2 -> $(image "$IMAGE_TAG")"
  az ml environment create --file "$here/environment.yml" --version 2 --set image="$(image "$IMAGE_TAG")" "${aml[@]}"
  say "creating deployment green with 0% traffic"
  az ml online-deployment create --file "$here/deployment-green.yml" --endpoint-name "$ENDPOINT_NAME" "${aml[@]}"
  cmd_test green
}

cmd_shift() {
  local pct=${1:?usage: deploy.sh shift PERCENT}
  local blue_count
  blue_count=$(az ml online-deployment show --name blue --endpoint-name "$ENDPOINT_NAME" "${aml[@]}" --query instance_count -o tsv)
  say "scaling green to $blue_count instances"
  az ml online-deployment update --name green --endpoint-name "$ENDPOINT_NAME" --set instance_count="$blue_count" "${aml[@]}"
  say "traffic: blue=$((100 - pct)) green=$pct"
  az ml online-endpoint update --name "$ENDPOINT_NAME" --traffic "blue=$((100 - pct)) green=$pct" "${aml[@]}"
}

cmd_promote() {
  say "traffic: green=100"
  az ml online-endpoint update --name "$ENDPOINT_NAME" --traffic "blue=0 green=100" "${aml[@]}"
  say "deleting deployment blue"
  az ml online-deployment delete --name blue --endpoint-name "$ENDPOINT_NAME" --yes "${aml[@]}"
}

cmd_rollback() {
  say "traffic: blue=100 green=0"
  az ml online-endpoint update --name "$ENDPOINT_NAME" --traffic "blue=100 green=0" "${aml[@]}"
}

cmd_autoscale() { ENDPOINT_NAME=$ENDPOINT_NAME DEPLOYMENT_NAME=${1:-blue} "$here/autoscale.sh"; }
cmd_logs() { az ml online-deployment get-logs --name "${1:-blue}" --endpoint-name "$ENDPOINT_NAME" --lines 200 "${aml[@]}"; }
cmd_delete() { az ml online-endpoint delete --name "$ENDPOINT_NAME" --yes "${aml[@]}"; }

step=$1
shift
case "$step" in
  image | create | test | green | shift | promote | rollback | autoscale | logs | delete) "cmd_$step" "$@" ;;
  *) echo "unknown step '$step'" >&2; sed -n '2,17p' "$0"; exit 2 ;;
esac
