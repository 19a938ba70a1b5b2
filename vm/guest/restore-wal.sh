#!/bin/sh
# restore_command inside a compute VM: the guest has no Node.js, so this is vm/restore-wal.js in
# shell + curl, with the same contract:
#   xenon-restore-wal <restore_url> <file> <dest> <upto>
# exit 0: restored; 1: the resolver says the file does not exist (PS_WAL_NOT_FOUND: the normal
# end of WAL); 200: anything else (Postgres aborts recovery instead of promoting early).
url="$1$2?upto=$4"
dest="$3"
tmp="$dest.tmp"
fail() {
  echo "xenon restore-wal: $*" >&2
  rm -f "$tmp"
  exit 200
}
[ $# -eq 4 ] || fail "usage: xenon-restore-wal <restore_url> <file> <dest> <upto>"
code=$(curl -sS --max-time 60 -o "$tmp" -w '%{http_code}' "$url") || fail "GET $url failed"
case "$code" in
  200) ;;
  404)
    if grep -q '"PS_WAL_NOT_FOUND"' "$tmp"; then rm -f "$tmp"; exit 1; fi
    fail "GET $url: HTTP 404 $(head -c 500 "$tmp")" ;;
  *) fail "GET $url: HTTP $code $(head -c 500 "$tmp")" ;;
esac
case "$2" in
  *.*) ;;
  *)
    size=$(stat -c %s "$tmp")
    [ "$size" = 16777216 ] || fail "GET $url: a WAL segment of $size bytes, expected 16777216" ;;
esac
sync "$tmp" && mv "$tmp" "$dest" || fail "writing $dest failed"
exit 0
