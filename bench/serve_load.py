"""Closed-loop load on `agpt serve`: C clients, each with a keep-alive connection, POST the same image to
/v1/inspect for T seconds. Prints one JSON line: requests/s, latency p50/p90/p99 (ms), errors, and the mean batch
size the server formed (from /metrics).

  serve_load.py URL IMAGE CONCURRENCY SECONDS [QUERY]
"""
import http.client
import json
import sys
import threading
import time
import urllib.parse


def metric_sum(text, name):
    return sum(float(l.split()[-1]) for l in text.splitlines() if l.startswith(name + " ") or l.startswith(name + "{"))


def main():
    url, image, conc, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    query = sys.argv[5] if len(sys.argv) > 5 else ""
    u = urllib.parse.urlparse(url)
    data = open(image, "rb").read()
    ctype = "image/png" if data[:4] == b"\x89PNG" else "image/jpeg"

    def metrics():
        c = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
        c.request("GET", "/metrics")
        t = c.getresponse().read().decode()
        c.close()
        return metric_sum(t, "agpt_batch_size_sum"), metric_sum(t, "agpt_batch_size_count")

    lat, errors = [], [0]
    lock = threading.Lock()
    t_end = time.time() + seconds

    def client():
        c = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
        while time.time() < t_end:
            t0 = time.time()
            try:
                c.request("POST", "/v1/inspect" + query, data, {"Content-Type": ctype})
                r = c.getresponse()
                r.read()
                ok = r.status == 200
            except OSError:
                ok = False
                c.close()
                c = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
            with lock:
                if ok:
                    lat.append(time.time() - t0)
                else:
                    errors[0] += 1
        c.close()

    s0, n0 = metrics()
    threads = [threading.Thread(target=client) for _ in range(conc)]
    t0 = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.time() - t0
    s1, n1 = metrics()
    lat.sort()
    q = lambda p: 1e3 * lat[min(len(lat) - 1, int(p * len(lat)))] if lat else None
    print(json.dumps({"concurrency": conc, "seconds": round(wall, 2), "requests": len(lat), "errors": errors[0],
                      "rps": round(len(lat) / wall, 2), "p50_ms": q(0.5), "p90_ms": q(0.9), "p99_ms": q(0.99),
                      "mean_batch": round((s1 - s0) / (n1 - n0), 2) if n1 > n0 else None}))


if __name__ == "__main__":
    main()
