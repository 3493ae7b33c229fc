#!/usr/bin/env python3
"""Static HTTP/1.0 file server for bench/compare.py, bound to one loopback address.

usage: httpd.py ADDR PORT DIR

It must be far faster than any overlay under test, so unlike `python3 -m http.server`:
 - TCP_NODELAY on every connection, no request logging;
 - a small file goes out with its headers in ONE write (separate header and body writes let
   Nagle + delayed ACK add ~40 ms to some small GETs);
 - a large file goes out with sendfile(2) (no copies through Python, little server CPU).
"""
import functools
import http.server
import sys

SMALL = 65536


class Handler(http.server.SimpleHTTPRequestHandler):
    """GET/HEAD of files under the served directory."""

    disable_nagle_algorithm = True
    protocol_version = "HTTP/1.0"
    wbufsize = 1 << 20  # buffered: the headers wait for the first part of the body

    def copyfile(self, source, outputfile):
        head = source.read(SMALL)
        outputfile.write(head)
        if len(head) < SMALL:
            return  # flushed together with the headers when the handler finishes
        outputfile.flush()
        self.request.sendfile(source, offset=len(head))

    def log_message(self, *args):
        pass


def main(argv):
    if len(argv) != 4:
        sys.exit(__doc__)
    addr, port, root = argv[1], int(argv[2]), argv[3]
    if not addr.startswith("127."):
        sys.exit("httpd.py: refusing to listen on %s: loopback addresses (127.0.0.0/8) only" % addr)
    http.server.ThreadingHTTPServer.daemon_threads = True
    http.server.ThreadingHTTPServer.request_queue_size = 64
    srv = http.server.ThreadingHTTPServer((addr, port), functools.partial(Handler, directory=root))
    srv.serve_forever()


if __name__ == "__main__":
    main(sys.argv)
