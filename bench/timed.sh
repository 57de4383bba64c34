# Sourced by the bench scripts: `timed LABEL COMMAND...` runs COMMAND with its output in $WORK/LABEL.log, appends
# {"label", "seconds", "exit"} to $WORK/timings.jsonl and prints one line, prefixed with $BENCH_NAME.
timed() {
    local label=$1 start end status
    shift
    start=$(date +%s.%N)
    "$@" > "$WORK/$label.log" 2>&1
    status=$?
    end=$(date +%s.%N)
    python3 -c "import json,sys; print(json.dumps({'label': sys.argv[1], 'seconds': round(float(sys.argv[3]) - float(sys.argv[2]), 2), 'exit': int(sys.argv[4])}))" \
        "$label" "$start" "$end" "$status" >> "$WORK/timings.jsonl"
    echo "$BENCH_NAME: $label exit $status ($(python3 -c "print(round($end - $start, 1))") s)"
}
