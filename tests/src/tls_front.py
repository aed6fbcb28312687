"""A TLS front for the SlapOS tests: terminates TLS on 127.0.0.1:PORT with
DIR/server.pem and DIR/server.key, demands a client certificate issued by
DIR/ca.pem (as the real SlapOS master does), and forwards each accepted
connection to 127.0.0.1:BACKEND (slapproxy, which speaks plain HTTP).

    python3 tls_front.py PORT BACKEND DIR

Python's ssl module (OpenSSL) sets the session id context a server that
verifies clients needs, so clients that resume TLS sessions are served
(socat's OpenSSL front refuses them: "session id context uninitialized").
Prints "listening" once ready and one line per refused handshake.
"""

import socket
import ssl
import sys
import threading


def pipe(source, sink):
    try:
        while True:
            data = source.recv(65536)
            if not data:
                break
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for end in (source, sink):
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def serve(context, connection, backend):
    try:
        client = context.wrap_socket(connection, server_side=True)
    except (ssl.SSLError, OSError) as error:
        print("refused:", error, flush=True)
        connection.close()
        return
    upstream = socket.create_connection(("127.0.0.1", backend))
    threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()
    pipe(client, upstream)


def main():
    port, backend, folder = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder + "/server.pem", folder + "/server.key")
    context.load_verify_locations(folder + "/ca.pem")
    context.verify_mode = ssl.CERT_REQUIRED
    listener = socket.create_server(("127.0.0.1", port))
    print("listening", flush=True)
    while True:
        connection, _ = listener.accept()
        threading.Thread(
            target=serve, args=(context, connection, backend), daemon=True
        ).start()


if __name__ == "__main__":
    main()
