#!/usr/bin/env node
import { Command } from 'commander';
import { readFileSync } from 'node:fs';
import { registerBenchCommand } from './bench-command.js';
import { registerDemoCommand } from './demo-command.js';
import { registerEppCommand } from './epp-command.js';
import { registerServeCommand } from './serve-command.js';
import { registerSimCommand } from './sim-command.js';

const pkg = JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version: string };

const program = new Command()
  .name('kvgate')
  .description('Cache-aware, load-aware request router for vLLM and SGLang inference clusters')
  .version(pkg.version)
  // A mistyped flag or command: commander's one-line error with its "Did you mean …?" and a
  // pointer to --help, not the whole help text (subcommands inherit these settings).
  .showSuggestionAfterError(true)
  .showHelpAfterError("(run with --help for every flag)");

registerServeCommand(program);
registerEppCommand(program);
registerSimCommand(program);
registerBenchCommand(program);
registerDemoCommand(program);

await program.parseAsync(process.argv);
