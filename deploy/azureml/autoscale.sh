#!/usr/bin/env bash
# Azure Monitor autoscale for one amlserve deployment: 2..6 instances.
#   out +1 when the deployment's CPU averages > 70% over 5 minutes (amlserve's engine keeps the cores busy while it
#          generates, so sustained CPU means a full batch),
#   out +1 when the endpoint's P90 request latency averages > 30 s over 5 minutes (requests are queueing),
#   in  -1 when CPU averages < 25% over 10 minutes.
# Scale-in drains an instance: amlserve fails readiness on SIGTERM and finishes in-flight requests (30 s grace).
# Env: RESOURCE_GROUP, WORKSPACE, ENDPOINT_NAME, DEPLOYMENT_NAME (blue), MIN (2), MAX (6).
set -euo pipefail
: "${RESOURCE_GROUP:?}" "${WORKSPACE:?}" "${ENDPOINT_NAME:?}"
DEPLOYMENT_NAME=${DEPLOYMENT_NAME:-blue}
aml=(--resource-group "$RESOURCE_GROUP" --workspace-name "$WORKSPACE")

endpoint_id=$(az ml online-endpoint show --name "$ENDPOINT_NAME" "${aml[@]}" --query id -o tsv)
deployment_id=$(az ml online-deployment show --name "$DEPLOYMENT_NAME" --endpoint-name "$ENDPOINT_NAME" "${aml[@]}" --query id -o tsv)
settings="autoscale-$ENDPOINT_NAME-$DEPLOYMENT_NAME"

az monitor autoscale create --resource-group "$RESOURCE_GROUP" --name "$settings" --resource "$deployment_id" \
  --min-count "${MIN:-2}" --max-count "${MAX:-6}" --count "${MIN:-2}"
az monitor autoscale rule create --resource-group "$RESOURCE_GROUP" --autoscale-name "$settings" \
  --condition "CpuUtilizationPercentage > 70 avg 5m" --scale out 1 --cooldown 5
az monitor autoscale rule create --resource-group "$RESOURCE_GROUP" --autoscale-name "$settings" \
  --condition "RequestLatency_P90 > 30000 avg 5m" --scale out 1 --cooldown 5 --resource "$endpoint_id"
az monitor autoscale rule create --resource-group "$RESOURCE_GROUP" --autoscale-name "$settings" \
  --condition "CpuUtilizationPercentage < 25 avg 10m" --scale in 1 --cooldown 10
az monitor autoscale show --resource-group "$RESOURCE_GROUP" --name "$settings" --query "profiles[0].rules[].metricTrigger.[metricName, operator, threshold]" -o table
