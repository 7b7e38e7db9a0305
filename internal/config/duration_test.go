package config

import (
	"errors"
	"strings"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"
)

func TestDurationYAML(t *testing.T) {
	tests := []struct {
		in      string
		want    time.Duration
		wantErr string // "" = no error
	}{
		{"1000", time.Second, ""},
		{"0", 0, ""},
		{"1_500", 1500 * time.Millisecond, ""},
		{`"60000"`, time.Minute, ""},
		{"1s", time.Second, ""},
		{"250ms", 250 * time.Millisecond, ""},
		{"1m30s", 90 * time.Second, ""},
		{`"2h"`, 2 * time.Hour, ""},
		{"abc", 0, `line 1: invalid duration "abc": want milliseconds (1000) or a Go duration (1s)`},
		{"1.5", 0, `invalid duration "1.5": want milliseconds`},
		{"10 s", 0, `invalid duration "10 s": want milliseconds`},
		{"-5", 0, `invalid duration "-5": must not be negative`},
		{"-1s", 0, `invalid duration "-1s": must not be negative`},
		{"99999999999999999", 0, "too large"},
		{"true", 0, `invalid duration "true"`},
		{"[1]", 0, "invalid duration: want milliseconds"},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			var v struct {
				D Duration `yaml:"d"`
			}
			err := yaml.Unmarshal([]byte("d: "+tt.in), &v)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error = %v, want it to contain %q", err, tt.wantErr)
				}
				if _, ok := errors.AsType[*Error](err); !ok {
					t.Errorf("error %v (%T) is not a *Error", err, err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if v.D.D() != tt.want {
				t.Errorf("got %v, want %v", v.D.D(), tt.want)
			}
		})
	}
}

func TestDurationSet(t *testing.T) {
	tests := []struct {
		in      string
		want    time.Duration
		wantErr string
	}{
		{"1000", time.Second, ""},
		{"+20", 20 * time.Millisecond, ""},
		{"1s", time.Second, ""},
		{"0", 0, ""},
		{"", 0, "want milliseconds (1000) or a Go duration (1s)"},
		{"x", 0, `invalid duration "x"`},
		{"-1", 0, "must not be negative"},
		{"-99999999999999999999", 0, "must not be negative"},
		{"-+5", 0, "want milliseconds"},
		{"-2m", 0, "must not be negative"},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			d := Duration(42)
			err := d.Set(tt.in)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error = %v, want it to contain %q", err, tt.wantErr)
				}
				if d != 42 {
					t.Errorf("failed Set changed the value to %v", d)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if d.D() != tt.want {
				t.Errorf("got %v, want %v", d.D(), tt.want)
			}
			// String must round-trip through Set: flags print it as the default.
			var back Duration
			if err := back.Set(d.String()); err != nil || back != d {
				t.Errorf("Set(%q) = %v, %v; want %v", d.String(), back, err, d)
			}
		})
	}
}
