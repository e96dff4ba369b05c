#!/usr/bin/env bash
# Azure Monitor autoscale for ONE amlserve deployment (slot), not the endpoint: the setting targets the deployment's
# instance count, and every rule reads metrics of that deployment only (endpoint metrics filtered on its
# `deployment` dimension), so a slot at 0% traffic is never scaled by its neighbour's load. deploy.sh promote and
# rollback move the setting with the traffic.
#
# Why not CPU: amlserve's engine uses every core as soon as one stream decodes, so CPU reads ~100% at light load
# (scale-out to the maximum) and falls only when idle. The rules read what "busy" means to a client instead:
#   out +1  RequestLatency_P90 of this deployment > 30 s over 5 min: a generation that AMLSERVE_MAX_TOKENS_LIMIT
#           (1024) bounds at ~21 s takes longer only when requests queue for a place in the batch;
#   out +1  any 429 from the gateway for this deployment over 5 min: more than 2 x max_concurrent x instances in flight;
#   in  -1  RequestLatency_P90 < 8 s over 15 min (every request fits in the batch at once), 15 min cooldown: a
#           removed instance drains its streams (drain delay + shutdown grace).
# amlserve's own queue-depth and KV-cache gauges (amlserve_num_requests_waiting, amlserve_kv_cache_usage_perc) are
# the better signal, as on Kubernetes (deploy/kubernetes/base/scaledobject.yaml), but a managed endpoint does not scrape
# /metrics, and amlserve does not export them to Azure Monitor yet (README.md "Metrics in Azure Monitor" says what it
# takes); until then the gateway's per-deployment latency and 429s stand in for them.
#
# Env: RESOURCE_GROUP, WORKSPACE, ENDPOINT_NAME, DEPLOYMENT_NAME (blue), MIN (2), MAX (6), COUNT (MIN: the count to
#      start from, e.g. the old slot's when the setting moves).
# Check the metric and dimension names your region offers with:
#   az monitor metrics list-definitions --resource "$endpoint_id" --query "[].{name: name.value, dims: dimensions[].value}"
set -euo pipefail
: "${RESOURCE_GROUP:?}" "${WORKSPACE:?}" "${ENDPOINT_NAME:?}"
DEPLOYMENT_NAME=${DEPLOYMENT_NAME:-blue}
MIN=${MIN:-2} MAX=${MAX:-6}
COUNT=${COUNT:-$MIN}
aml=(--resource-group "$RESOURCE_GROUP" --workspace-name "$WORKSPACE")

endpoint_id=$(az ml online-endpoint show --name "$ENDPOINT_NAME" "${aml[@]}" --query id -o tsv)
deployment_id=$(az ml online-deployment show --name "$DEPLOYMENT_NAME" --endpoint-name "$ENDPOINT_NAME" "${aml[@]}" --query id -o tsv)
settings="autoscale-$ENDPOINT_NAME-$DEPLOYMENT_NAME"
mine="where deployment == $DEPLOYMENT_NAME"
rule() { az monitor autoscale rule create --resource-group "$RESOURCE_GROUP" --autoscale-name "$settings" -o none "$@"; }

az monitor autoscale create --resource-group "$RESOURCE_GROUP" --name "$settings" --resource "$deployment_id" \
  --min-count "$MIN" --max-count "$MAX" --count "$(( COUNT < MIN ? MIN : (COUNT > MAX ? MAX : COUNT) ))" -o none
rule --resource "$endpoint_id" --condition "RequestLatency_P90 > 30000 avg 5m $mine" --scale out 1 --cooldown 5
rule --resource "$endpoint_id" --condition "RequestsPerMinute > 0 total 5m $mine and statusCode == 429" --scale out 1 --cooldown 5
rule --resource "$endpoint_id" --condition "RequestLatency_P90 < 8000 avg 15m $mine" --scale in 1 --cooldown 15
az monitor autoscale show --resource-group "$RESOURCE_GROUP" --name "$settings" \
  --query "profiles[0].rules[].metricTrigger.[metricName, operator, threshold, dimensions[0].values[0]]" -o table
