// Command wsp is a reverse HTTP proxy over WebSocket: see README.md.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"wsp/internal/config"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	os.Exit(exitCode(err, os.Stderr))
}

// usageError is bad usage: exit status 2.
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

// errHelp is -h: usage was printed, exit 0.
var errHelp = errors.New("help")

func exitCode(err error, stderr io.Writer) int {
	var ue *usageError
	var ce *config.Error
	switch {
	case err == nil, errors.Is(err, errHelp):
		return 0
	case errors.As(err, &ue), errors.As(err, &ce):
		fmt.Fprintln(stderr, "wsp:", err)
		return 2
	default:
		fmt.Fprintln(stderr, "wsp:", err)
		return 1
	}
}

const usage = `wsp: a reverse HTTP proxy over WebSocket

usage:
  wsp server  [-config FILE] [flags]   accept clients, relay app requests to them
  wsp client  [-config FILE] [flags]   dial servers, execute the requests they relay
  wsp forward -server URL -listen ADDR -to HOST:PORT
                                       carry local connections through a CONNECT tunnel
  wsp demo                             server + client + sample API on loopback
  wsp version                          print version information

'wsp COMMAND -h' lists a command's flags.
`

// run is the whole program, minus process exit: tests call it directly.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return &usageError{"missing command"}
	}
	cmd, args := args[0], args[1:]
	switch cmd {
	case "server":
		return runServer(ctx, args, stderr)
	case "client":
		return runClient(ctx, args, stderr)
	case "forward":
		return runForward(ctx, args, stderr)
	case "demo":
		return runDemo(ctx, args, stdout, stderr)
	case "version":
		return runVersion(args, stdout, stderr)
	case "-h", "-help", "--help", "help":
		fmt.Fprint(stdout, usage)
		return nil
	default:
		fmt.Fprint(stderr, usage)
		return &usageError{fmt.Sprintf("unknown command %q", cmd)}
	}
}
