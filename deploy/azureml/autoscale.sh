#!/usr/bin/env bash
# Azure Monitor autoscale for ONE amlserve deployment (slot), not the endpoint: the setting targets the deployment's
# instance count, and every rule reads metrics of that deployment only (filtered on a `deployment` dimension), so a
# slot at 0% traffic is never scaled by its neighbour's load. deploy.sh promote and rollback move the setting with the
# traffic.
#
# Why not CPU: amlserve's engine uses every core as soon as one stream decodes, so CPU reads ~100% at light load
# (scale-out to the maximum) and falls only when idle. The rules read what "busy" means instead.
#
# With APP_INSIGHTS_ID (the resource id of the Application Insights resource the slot exports to: deploy.sh release
# and create pass it its connection string and OTEL_RESOURCE_ATTRIBUTES=deployment=<slot>), amlserve's own queue depth
# drives them: the custom metric amlserve_num_requests_waiting (namespace azure.applicationinsights, the average of the
# instances' values, sent every minute), filtered on its `deployment` dimension. The Application Insights resource must
# store custom metric dimensions ("Usage and estimated costs" > "Custom metrics": "With dimensions"); without it the
# filter matches nothing and these rules never fire.
#   out +1  amlserve_num_requests_waiting > 4 avg 5m: requests queue for a place in the batch (or for KV cache);
#   out +1  any 429 from the gateway for this deployment over 5 min (RequestsPerMinute, statusCode == 429): more than
#           2 x max_concurrent x instances in flight, which amlserve cannot see;
#   in  -1  amlserve_num_requests_waiting < 1 avg 15m AND RequestLatency_P90 < 8 s avg 15m (autoscale scales in only
#           when every scale-in rule holds), 15 min cooldown: a removed instance drains (drain delay + grace).
# Without it, or when the slot does not export (released without APP_INSIGHTS_ID), the gateway's per-deployment
# metrics of the endpoint (dimension `deployment`) stand in:
#   out +1  RequestLatency_P90 > 30 s over 5 min: a generation that AMLSERVE_MAX_TOKENS_LIMIT (1024) bounds at ~21 s
#           takes longer only when requests queue for a place in the batch;
#   out +1  any 429 from the gateway, as above;
#   in  -1  RequestLatency_P90 < 8 s over 15 min (every request fits in the batch at once), 15 min cooldown.
# Metric names and dimensions: "Supported metrics for Microsoft.MachineLearningServices/workspaces/onlineEndpoints"
# (RequestLatency_P90: deployment; RequestsPerMinute: deployment, statusCode, statusCodeClass, modelStatusCode).
#
# Env: RESOURCE_GROUP, WORKSPACE, ENDPOINT_NAME, DEPLOYMENT_NAME (blue), MIN (2), MAX (6), COUNT (MIN: the count to
#      start from, e.g. the old slot's when the setting moves), APP_INSIGHTS_ID (optional:
#      /subscriptions/.../providers/microsoft.insights/components/NAME).
# Check the metric and dimension names your region offers with:
#   az monitor metrics list-definitions --resource "$endpoint_id" --query "[].{name: name.value, dims: dimensions[].value}"
#   az monitor metrics list-definitions --resource "$APP_INSIGHTS_ID" --namespace azure.applicationinsights
set -euo pipefail
: "${RESOURCE_GROUP:?}" "${WORKSPACE:?}" "${ENDPOINT_NAME:?}"
DEPLOYMENT_NAME=${DEPLOYMENT_NAME:-blue}
MIN=${MIN:-2} MAX=${MAX:-6}
COUNT=${COUNT:-$MIN}
APP_INSIGHTS_ID=${APP_INSIGHTS_ID:-}
aml=(--resource-group "$RESOURCE_GROUP" --workspace-name "$WORKSPACE")
shopt -s nocasematch
app_insights_id='^/subscriptions/[^/]+/resourceGroups/[^/]+/providers/microsoft\.insights/components/[^/]+$'
if [ -n "$APP_INSIGHTS_ID" ] && ! [[ "$APP_INSIGHTS_ID" =~ $app_insights_id ]]; then
  echo "autoscale.sh: APP_INSIGHTS_ID must be an Application Insights resource id" \
    "(/subscriptions/<sub>/resourceGroups/<rg>/providers/microsoft.insights/components/<name>), not '$APP_INSIGHTS_ID'" >&2
  exit 2
fi

endpoint_id=$(az ml online-endpoint show --name "$ENDPOINT_NAME" "${aml[@]}" --query id -o tsv)
deployment_id=$(az ml online-deployment show --name "$DEPLOYMENT_NAME" --endpoint-name "$ENDPOINT_NAME" "${aml[@]}" --query id -o tsv)
settings="autoscale-$ENDPOINT_NAME-$DEPLOYMENT_NAME"
mine="where deployment == $DEPLOYMENT_NAME"
rule() { az monitor autoscale rule create --resource-group "$RESOURCE_GROUP" --autoscale-name "$settings" -o none "$@"; }

# Does the slot export its metrics? A connection string in its environment, or Azure ML's app_insights_enabled.
# (The query answers true or false: the connection string itself is never printed.)
exports=false
if [ -n "$APP_INSIGHTS_ID" ]; then
  exports=$(az ml online-deployment show --name "$DEPLOYMENT_NAME" --endpoint-name "$ENDPOINT_NAME" "${aml[@]}" \
    --query "environment_variables.APPLICATIONINSIGHTS_CONNECTION_STRING != null || app_insights_enabled == \`true\`" -o tsv)
  [[ "$exports" == true ]] || echo "autoscale.sh: $DEPLOYMENT_NAME does not export its metrics (released without" \
    "APP_INSIGHTS_ID): the gateway's metrics drive its rules" >&2
fi

az monitor autoscale create --resource-group "$RESOURCE_GROUP" --name "$settings" --resource "$deployment_id" \
  --min-count "$MIN" --max-count "$MAX" --count "$(( COUNT < MIN ? MIN : (COUNT > MAX ? MAX : COUNT) ))" -o none
# The gateway refuses beyond its concurrency limit whatever amlserve reports: always a reason to scale out.
rule --resource "$endpoint_id" --condition "RequestsPerMinute > 0 total 5m $mine and statusCode == 429" --scale out 1 --cooldown 5
rule --resource "$endpoint_id" --condition "RequestLatency_P90 < 8000 avg 15m $mine" --scale in 1 --cooldown 15
if [[ "$exports" == true ]]; then
  # A full resource id: --resource-namespace / --resource-type are only for a resource given by name.
  queue='"azure.applicationinsights" amlserve_num_requests_waiting'
  rule --resource "$APP_INSIGHTS_ID" --condition "$queue > 4 avg 5m $mine" --scale out 1 --cooldown 5
  rule --resource "$APP_INSIGHTS_ID" --condition "$queue < 1 avg 15m $mine" --scale in 1 --cooldown 15
else
  rule --resource "$endpoint_id" --condition "RequestLatency_P90 > 30000 avg 5m $mine" --scale out 1 --cooldown 5
fi
az monitor autoscale show --resource-group "$RESOURCE_GROUP" --name "$settings" \
  --query "profiles[0].rules[].metricTrigger.[metricNamespace, metricName, operator, threshold, dimensions[0].values[0]]" -o table
