package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// TestExitCodes checks the contract of the command line: 0 on success and
// -h, 2 on bad usage or configuration with a message naming what is wrong.
func TestExitCodes(t *testing.T) {
	dir := t.TempDir()
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	unknownKey := write("unknown.yaml", "host: 127.0.0.1\nporrt: 8080\n")
	badRegex := write("regex.yaml", "allowany: false\nwhitelist:\n  - url: \"(\"\n")
	noWhitelist := write("open.yaml", "id: c1\n")

	for _, tc := range []struct {
		args     []string
		code     int
		inStderr string
		inStdout string
	}{
		{nil, 2, "missing command", ""},
		{[]string{"frobnicate"}, 2, `unknown command "frobnicate"`, ""},
		{[]string{"version"}, 0, "", "wsp "},
		{[]string{"server", "-h"}, 0, "-idletimeout", ""},
		{[]string{"server", "-nosuchflag"}, 2, "nosuchflag", ""},
		{[]string{"server", "-config", unknownKey}, 2, `line 2: unknown key "porrt"`, ""},
		{[]string{"server", "-timeout", "soon"}, 2, "timeout", ""},
		{[]string{"client", "-config", badRegex}, 2, "whitelist[0].url", ""},
		{[]string{"client", "-config", noWhitelist}, 2, "allowany", ""},
		{[]string{"server", "-config", filepath.Join(dir, "missing.yaml")}, 2, "missing.yaml", ""},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			err := run(context.Background(), tc.args, &stdout, &stderr)
			code := exitCode(err, &stderr)
			if code != tc.code || !strings.Contains(stderr.String(), tc.inStderr) || !strings.Contains(stdout.String(), tc.inStdout) {
				t.Fatalf("exit %d (want %d)\nstdout: %s\nstderr: %s", code, tc.code, stdout.String(), stderr.String())
			}
		})
	}
}
