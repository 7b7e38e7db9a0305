package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime"
	"runtime/debug"
	"syscall"

	"wsp/internal/admin"
	"wsp/internal/client"
	"wsp/internal/cluster"
	"wsp/internal/config"
	"wsp/internal/forward"
	"wsp/internal/server"
)

// Set at build time with -ldflags "-X main.version=... -X main.commit=...".
var (
	version = "dev"
	commit  = ""
)

func runServer(ctx context.Context, args []string, stderr io.Writer) error {
	cfg, err := config.LoadServer(config.ConfigPath(args))
	if err != nil {
		return err
	}
	fs := newFlagSet("server", stderr)
	cfg.Flags(fs)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	lw := newLogWriter(stderr)
	defer lw.Flush()
	log := newLogger(cfg.LogFormat, lw)
	log = slog.New(flushOnWarn{log.Handler(), lw})
	server.Version = version
	if cfg.Cluster.Enabled() {
		cluster.RouteLibraryLog(log)
	}
	// With cluster.redis, Serve starts the directory's heartbeats and, first
	// thing in a drain, removes this node's entries from it.
	srv, err := server.New(cfg, log)
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", cfg.Addr())
	if err != nil {
		return err
	}
	log.Info("listening", "addr", ln.Addr().String(), "tls", cfg.TLS.Enabled(), "version", version)
	stopAdmin, err := startAdmin(ctx, cfg.Admin, srv.AdminHandler(), log)
	if err != nil {
		ln.Close()
		return err
	}
	defer stopAdmin()
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	done := make(chan struct{})
	defer close(done)
	go func() {
		for {
			select {
			case <-hup:
				if err := srv.ReloadTLS(); err != nil {
					log.Error("TLS reload failed; keeping the previous certificate", "cause", err)
				} else if cfg.TLS.Enabled() {
					log.Info("TLS certificate reloaded")
				}
			case <-done:
				return
			}
		}
	}()
	return srv.Serve(ctx, ln)
}

func runClient(ctx context.Context, args []string, stderr io.Writer) error {
	cfg, err := config.LoadClient(config.ConfigPath(args))
	if err != nil {
		return err
	}
	fs := newFlagSet("client", stderr)
	cfg.Flags(fs)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	log := newLogger(cfg.LogFormat, stderr)
	client.Version = version
	c, err := client.New(cfg, log)
	if err != nil {
		return err
	}
	log.Info("starting", "id", cfg.ID, "targets", len(cfg.Targets), "version", version)
	stopAdmin, err := startAdmin(ctx, cfg.Admin, c.AdminHandler(), log)
	if err != nil {
		return err
	}
	defer stopAdmin()
	return c.Run(ctx)
}

// startAdmin serves h on addr (unless "") until ctx ends; stop waits for it.
func startAdmin(ctx context.Context, addr string, h http.Handler, log *slog.Logger) (stop func(), err error) {
	if addr == "" {
		return func() {}, nil
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("admin listener: %w", err)
	}
	log.Info("admin listening", "addr", "http://"+ln.Addr().String())
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := admin.Serve(ctx, ln, h); err != nil {
			log.Error("admin listener failed", "cause", err)
		}
	}()
	return func() { cancel(); <-done }, nil
}

func runVersion(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("wsp version", flag.ContinueOnError)
	fs.SetOutput(stderr)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	rev := commit
	if rev == "" {
		rev = "unknown"
		if info, ok := debug.ReadBuildInfo(); ok {
			for _, s := range info.Settings {
				if s.Key == "vcs.revision" {
					rev = s.Value
				}
			}
		}
	}
	fmt.Fprintf(stdout, "wsp %s\ncommit %s\n%s %s/%s\n", version, rev, runtime.Version(), runtime.GOOS, runtime.GOARCH)
	return nil
}

// newFlagSet returns a command's flag set with the -config flag every
// command that reads a file shares (config.ConfigPath read it already).
func newFlagSet(cmd string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("wsp "+cmd, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.String("config", "", "YAML configuration `file` (flags override it)")
	return fs
}

func parseFlags(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return errHelp
		}
		return &usageError{err.Error()}
	}
	if fs.NArg() > 0 {
		return &usageError{fmt.Sprintf("%s: unexpected argument %q", fs.Name(), fs.Arg(0))}
	}
	return nil
}

func newLogger(format string, w io.Writer) *slog.Logger {
	if format == "json" {
		return slog.New(slog.NewJSONHandler(w, nil))
	}
	return slog.New(slog.NewTextHandler(w, nil))
}

func runForward(ctx context.Context, args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("wsp forward", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var cfg forward.Config
	listen := fs.String("listen", "127.0.0.1:0", "local `address` to accept connections on")
	fs.StringVar(&cfg.Server, "server", "", "wsp server `URL` (http://host:port or https://host:port)")
	fs.StringVar(&cfg.To, "to", "", "destination `host:port`, reached by a client")
	fs.StringVar(&cfg.Client, "client", "", "client pool `id` to go through (default: the server chooses)")
	fs.StringVar(&cfg.Auth, "auth", "", "app credentials `user:password`, when the server requires them")
	logFormat := fs.String("logformat", "text", "log `format`: text or json")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	log := newLogger(*logFormat, stderr)
	f, err := forward.New(cfg, log)
	if err != nil {
		return &usageError{err.Error()}
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	log.Info("forwarding", "listen", ln.Addr().String(), "to", cfg.To, "server", cfg.Server)
	return f.Serve(ctx, ln)
}
