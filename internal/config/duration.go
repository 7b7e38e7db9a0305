package config

import (
	"fmt"
	"math"
	"strconv"
	"time"

	"go.yaml.in/yaml/v3"
)

// Duration is a configuration duration. It accepts root-gg/wsp's integer
// milliseconds (`timeout: 1000`), a string of digits (also milliseconds), or a
// Go duration string (`1s`, `250ms`), so existing configs keep working and new
// ones can say what they mean. Negative durations are an error.
type Duration time.Duration

// D returns d as a time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }

// String formats d as a Go duration ("1s"), which Set and YAML both accept.
func (d Duration) String() string { return time.Duration(d).String() }

// Set parses s as a flag value; the syntax is the same as in YAML.
func (d *Duration) Set(s string) error {
	v, msg := parseDuration(s)
	if msg != "" {
		return fmt.Errorf("invalid duration %q: %s", s, msg)
	}
	*d = v
	return nil
}

// UnmarshalYAML decodes an integer (milliseconds) or a string. Its errors are
// *Error and carry the line, e.g.
// `config: line 4: invalid duration "abc": want milliseconds (1000) or a Go duration (1s)`.
func (d *Duration) UnmarshalYAML(n *yaml.Node) error {
	fail := func(msg string) error {
		return &Error{Line: n.Line, Msg: fmt.Sprintf("invalid duration %q: %s", n.Value, msg)}
	}
	if n.Kind != yaml.ScalarNode {
		return &Error{Line: n.Line, Msg: "invalid duration: " + wantDuration}
	}
	switch n.ShortTag() {
	case "!!int":
		// Decoding through yaml accepts every integer form YAML does (1_000, 0x10).
		var ms int64
		if err := n.Decode(&ms); err != nil {
			return fail(wantDuration)
		}
		v, msg := fromMillis(ms)
		if msg != "" {
			return fail(msg)
		}
		*d = v
	case "!!str":
		v, msg := parseDuration(n.Value)
		if msg != "" {
			return fail(msg)
		}
		*d = v
	default:
		return fail(wantDuration)
	}
	return nil
}

const wantDuration = "want milliseconds (1000) or a Go duration (1s)"

// parseDuration returns the duration, or a message saying what is wrong with s.
func parseDuration(s string) (Duration, string) {
	if isInteger(s) {
		ms, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			if s[0] == '-' {
				return 0, "must not be negative"
			}
			return 0, "too large"
		}
		return fromMillis(ms)
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		// time's messages repeat the value and name no accepted form.
		return 0, wantDuration
	}
	if v < 0 {
		return 0, "must not be negative"
	}
	return Duration(v), ""
}

func fromMillis(ms int64) (Duration, string) {
	switch {
	case ms < 0:
		return 0, "must not be negative"
	case ms > math.MaxInt64/int64(time.Millisecond):
		return 0, "too large"
	}
	return Duration(time.Duration(ms) * time.Millisecond), ""
}

// isInteger reports whether s is an optionally signed string of ASCII digits.
func isInteger(s string) bool {
	if s != "" && (s[0] == '-' || s[0] == '+') {
		s = s[1:]
	}
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}
