package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync"
	"time"

	"wsp/internal/admin"
	"wsp/internal/client"
	"wsp/internal/config"
	"wsp/internal/rules"
	"wsp/internal/server"
)

// runDemo runs a server, a client and a sample internal API in one process
// on loopback and prints requests to try.
func runDemo(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("demo", stderr)
	port := fs.Int("port", 8080, "server `port` (the dashboard takes the next one); a free one is picked when taken")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	log := newLogger("text", stderr)

	apiLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	srvLn, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", *port))
	if err != nil {
		srvLn, err = net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			apiLn.Close()
			return err
		}
	}
	adminPort := 0 // with -port 0, any free one
	if *port != 0 {
		adminPort = *port + 1
	}
	adminLn, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", adminPort))
	if err != nil {
		adminLn, err = net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			apiLn.Close()
			srvLn.Close()
			return err
		}
	}
	api := "http://" + apiLn.Addr().String()
	relay := "http://" + srvLn.Addr().String()

	scfg := config.DefaultServer()
	srv, err := server.New(scfg, log.With("component", "server"))
	if err != nil {
		return err
	}
	ccfg := config.DefaultClient()
	ccfg.ID = "demo"
	ccfg.Targets = []string{"ws://" + srvLn.Addr().String() + "/register"}
	// Only the sample API: anything else is refused by the client.
	ccfg.Whitelist = []rules.Spec{{URL: "^" + api + "/"}}
	cl, err := client.New(ccfg, log.With("component", "client"))
	if err != nil {
		return err
	}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	apiSrv := &http.Server{Handler: sampleAPI(), ReadHeaderTimeout: 10 * time.Second}
	var wg sync.WaitGroup
	var srvErr error
	wg.Add(4)
	go func() { defer wg.Done(); apiSrv.Serve(apiLn) }()
	go func() { defer wg.Done(); admin.Serve(ctx, adminLn, srv.AdminHandler()) }()
	go func() {
		defer wg.Done()
		if srvErr = srv.Serve(ctx, srvLn); srvErr != nil {
			cancel()
		}
	}()
	go func() { defer wg.Done(); cl.Run(ctx) }()
	defer func() {
		cancel()
		apiSrv.Close()
		wg.Wait()
	}()

	deadline := time.Now().Add(10 * time.Second)
	for !cl.Ready() {
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("demo client did not connect to %s", relay)
		}
		time.Sleep(10 * time.Millisecond)
	}
	fmt.Fprintf(stdout, `wsp demo: server on %[1]s, client "demo" connected, sample API on %[2]s

Try:
  curl -H 'X-PROXY-DESTINATION: %[2]s/hello' %[1]s/request
  curl -N -H 'X-PROXY-DESTINATION: %[2]s/events' %[1]s/request
  curl -i -H 'X-PROXY-DESTINATION: http://169.254.169.254/latest/meta-data/' %[1]s/request
  curl -x %[1]s %[2]s/hello

The third is refused: the client's whitelist allows only the sample API.
Dashboard: http://%[3]s/   metrics: http://%[3]s/metrics
Ctrl-C stops the demo.
`, relay, api, adminLn.Addr().String())
	<-ctx.Done()
	return srvErr
}

// sampleAPI stands for an internal service behind the client.
func sampleAPI() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /hello", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello from the internal API (you came from %s)\n", r.Header.Get("X-Forwarded-For"))
	})
	mux.HandleFunc("GET /events", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		rc := http.NewResponseController(w)
		for i := 1; i <= 5; i++ {
			fmt.Fprintf(w, "data: event %d of 5 at %s\n\n", i, time.Now().Format(time.TimeOnly))
			rc.Flush()
			select {
			case <-r.Context().Done():
				return
			case <-time.After(time.Second):
			}
		}
	})
	mux.HandleFunc("POST /echo", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", r.Header.Get("Content-Type"))
		io.Copy(w, r.Body)
	})
	return mux
}
