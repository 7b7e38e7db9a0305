// Command backend is the destination API used by bench/run.sh: a minimal
// HTTP server whose own cost is as small as possible, so that the ratio
// "through wsp ÷ direct" measures wsp rather than the backend.
//
//	/small  ~100-byte body
//	/10m    10 MiB body, preallocated, with Content-Length
//
// It prints its actual listen address as the first line of stdout, so the
// caller can use -addr 127.0.0.1:0 and still learn the port without a race.
package main

import (
	"bytes"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"strconv"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:0", "listen address")
	flag.Parse()

	small := []byte("wsp bench backend: a small response body, about one hundred bytes long, for req/s tests.\n")
	for len(small) < 100 {
		small = append(small, '.')
	}
	// Preallocated once: the download test should measure the relay's copy
	// path, not the backend producing bytes.
	big := bytes.Repeat([]byte("0123456789abcdef"), 10<<20/16)

	mux := http.NewServeMux()
	mux.HandleFunc("/small", serve(small, "text/plain"))
	mux.HandleFunc("/10m", serve(big, "application/octet-stream"))

	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Fprintln(os.Stdout, ln.Addr().String())
	// The error log is discarded: wrk closing connections at the end of a
	// run makes the server log harmless "broken pipe" noise.
	srv := &http.Server{Handler: mux, ErrorLog: log.New(discard{}, "", 0)}
	log.Fatal(srv.Serve(ln))
}

func serve(body []byte, ctype string) http.HandlerFunc {
	length := strconv.Itoa(len(body))
	return func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h["Content-Type"] = []string{ctype}
		h["Content-Length"] = []string{length}
		if r.Method == http.MethodHead {
			return
		}
		w.Write(body)
	}
}

type discard struct{}

func (discard) Write(p []byte) (int, error) { return len(p), nil }
