#!/usr/bin/env bash
# Download the public LLM-serving traces on a machine with internet access.
#
#   bash traces/fetch_public.sh [DEST] [azure2023|azure2024|burstgpt|all]   (default: traces/public, all)
#
# Nothing downloaded here is committed (traces/public/ is outside version control: keep it
# that way, some files are over 1 GB). Sources, formats and licences:
#
# - Azure LLM inference trace 2023 (Splitwise, ISCA 2024), one hour on 2023-11-16, code and
#   conversation services, TIMESTAMP,ContextTokens,GeneratedTokens, CC-BY 4.0.
#   https://github.com/Azure/AzurePublicDataset/blob/master/AzureLLMInferenceDataset2023.md
# - Azure LLM inference trace 2024 (DynamoLLM, HPCA 2025), one week in May 2024, same columns,
#   CC-BY 4.0; code ~690 MB / 16.8M requests, conversation ~1.1 GB / 27M requests. Published on
#   Azure blob storage, since mirrored to the repository's GitHub release `dataset-llm-2024`.
#   https://github.com/Azure/AzurePublicDataset/blob/master/AzureLLMInferenceDataset2024.md
# - BurstGPT (Wang et al., KDD 2025), ChatGPT and GPT-4 requests on Azure OpenAI over four months,
#   Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type, CC-BY 4.0.
#   `_without_fails_` files drop the failed requests (0 response tokens).
#   https://github.com/HPMLL/BurstGPT
#
# Then replay, e.g.:
#   dilaserve replay --trace traces/public/azure2024/AzureLLMInferenceTrace_conv_1week.csv \
#       --duration 600 --endpoint http://127.0.0.1:8000 --out runs/replay.jsonl
# (for the week-long files, --max-rows N reads only the first N rows instead of all 27M).
set -euo pipefail

DEST="${1:-$(dirname "$0")/public}"
WHICH="${2:-all}"

AZURE_RAW="https://raw.githubusercontent.com/Azure/AzurePublicDataset/master/data"
AZURE_2024_RELEASE="https://github.com/Azure/AzurePublicDataset/releases/download/dataset-llm-2024"
AZURE_2024_BLOB="https://azurepublicdatasettraces.blob.core.windows.net/azurellminfererencetrace"
BURSTGPT_RELEASE="https://github.com/HPMLL/BurstGPT/releases/download/v1.1"

# fetch OUT URL [FALLBACK_URL]: download once (resumable), check it is CSV and not an error page.
fetch() {
  local out="$1"; shift
  if [[ -s "$out" ]]; then echo "have $out"; return 0; fi
  mkdir -p "$(dirname "$out")"
  for url in "$@"; do
    echo "fetching $url"
    if curl -fL --retry 3 -C - -o "$out.part" "$url"; then
      if head -c 200 "$out.part" | grep -qi -e "TIMESTAMP" -e "Timestamp"; then
        mv "$out.part" "$out"; echo "  -> $out ($(wc -c < "$out") bytes)"; return 0
      fi
      echo "  not a trace CSV (header: $(head -c 80 "$out.part"))" >&2
    fi
    rm -f "$out.part"
  done
  echo "could not fetch $out" >&2
  return 1
}

if [[ "$WHICH" == all || "$WHICH" == azure2023 ]]; then
  for service in conv code; do
    fetch "$DEST/azure2023/AzureLLMInferenceTrace_${service}.csv" "$AZURE_RAW/AzureLLMInferenceTrace_${service}.csv"
  done
fi
if [[ "$WHICH" == all || "$WHICH" == azure2024 ]]; then
  for service in conv code; do
    name="AzureLLMInferenceTrace_${service}_1week.csv"
    fetch "$DEST/azure2024/$name" "$AZURE_2024_RELEASE/$name" "$AZURE_2024_BLOB/$name"
  done
fi
if [[ "$WHICH" == all || "$WHICH" == burstgpt ]]; then
  for name in BurstGPT_1.csv BurstGPT_without_fails_1.csv BurstGPT_2.csv BurstGPT_without_fails_2.csv; do
    fetch "$DEST/burstgpt/$name" "$BURSTGPT_RELEASE/$name"
  done
fi
echo "done: $DEST"
