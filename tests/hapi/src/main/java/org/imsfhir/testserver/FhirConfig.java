package org.imsfhir.testserver;

import ca.uhn.fhir.batch2.jobs.config.Batch2JobsConfig;
import ca.uhn.fhir.batch2.jobs.export.BulkDataExportProvider;
import ca.uhn.fhir.batch2.maintenance.JobMaintenanceServiceImpl;
import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.context.support.IValidationSupport;
import ca.uhn.fhir.jpa.api.config.JpaStorageSettings;
import ca.uhn.fhir.jpa.api.config.ThreadPoolFactoryConfig;
import ca.uhn.fhir.jpa.api.dao.IFhirSystemDao;
import ca.uhn.fhir.jpa.batch2.JpaBatch2Config;
import ca.uhn.fhir.jpa.config.HapiJpaConfig;
import ca.uhn.fhir.jpa.config.r4.JpaR4Config;
import ca.uhn.fhir.jpa.config.util.HapiEntityManagerFactoryUtil;
import ca.uhn.fhir.jpa.model.config.PartitionSettings;
import ca.uhn.fhir.jpa.model.dialect.HapiFhirH2Dialect;
import ca.uhn.fhir.jpa.model.dialect.HapiFhirPostgresDialect;
import ca.uhn.fhir.jpa.provider.JpaCapabilityStatementProvider;
import ca.uhn.fhir.jpa.provider.JpaSystemProvider;
import ca.uhn.fhir.jpa.search.DatabaseBackedPagingProvider;
import ca.uhn.fhir.jpa.subscription.channel.config.SubscriptionChannelConfig;
import ca.uhn.fhir.rest.api.EncodingEnum;
import ca.uhn.fhir.rest.server.IncomingRequestAddressStrategy;
import ca.uhn.fhir.rest.server.RestfulServer;
import ca.uhn.fhir.rest.server.provider.ResourceProviderFactory;
import ca.uhn.fhir.rest.server.util.ISearchParamRegistry;
import jakarta.persistence.EntityManagerFactory;
import java.util.Properties;
import javax.sql.DataSource;
import org.apache.commons.dbcp2.BasicDataSource;
import org.springframework.beans.factory.config.BeanPostProcessor;
import org.springframework.beans.factory.config.ConfigurableListableBeanFactory;
import org.springframework.beans.factory.annotation.Value;
import org.springframework.boot.web.servlet.ServletRegistrationBean;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;
import org.springframework.context.annotation.Import;
import org.springframework.context.annotation.Primary;
import org.springframework.orm.jpa.JpaTransactionManager;
import org.springframework.orm.jpa.LocalContainerEntityManagerFactoryBean;

/**
 * The beans HAPI's JPA server needs beyond its own configuration classes. What each one enables
 * is what ims-fhir relies on: transactions, conditional create and update, versioned updates
 * (If-Match), _history, paging, $validate, Bulk Data $export.
 */
@Configuration
@Import({
	JpaR4Config.class,
	HapiJpaConfig.class,
	JpaBatch2Config.class,
	Batch2JobsConfig.class,
	ThreadPoolFactoryConfig.class,
	// Batch2 jobs (reindexing, $expunge) talk over an in-memory message broker.
	SubscriptionChannelConfig.class
})
public class FhirConfig {

	@Bean
	public JpaStorageSettings storageSettings() {
		JpaStorageSettings settings = new JpaStorageSettings();
		// As HAPI's jpaserver-starter sets them by default (what users run): conditional
		// references such as "Patient?identifier=..." inside a transaction, and $expunge.
		// Multiple delete and delete-expunge stay off, as there.
		settings.setAllowInlineMatchUrlReferences(true);
		settings.setExpungeEnabled(true);
		// Bulk Data $export (system, Patient and Group level), as jpaserver-starter's
		// hapi.fhir.bulk_export_enabled=true sets it: the job runs on Batch2 and its NDJSON
		// files are Binary resources. Retention, file size and job reuse keep HAPI's defaults.
		settings.setEnableTaskBulkExportJobExecution(true);
		return settings;
	}

	/**
	 * How often Batch2 advances its jobs ({@code --ims.batch2-maintenance-ms}; HAPI's default,
	 * one minute, when not given). A Bulk Data export is a Batch2 job that moves one step per
	 * pass, so on stock settings even a tiny export takes three to four minutes; the tests pass
	 * a few seconds. The export's protocol (202, Retry-After, the manifest) is HAPI's own.
	 */
	@Bean
	public static BeanPostProcessor batch2MaintenanceFrequency(
			@Value("${ims.batch2-maintenance-ms:0}") long millis) {
		return new BeanPostProcessor() {
			@Override
			public Object postProcessAfterInitialization(Object bean, String name) {
				if (millis > 0 && bean instanceof JobMaintenanceServiceImpl maintenance) {
					maintenance.setScheduledJobFrequencyMillis(millis);
				}
				return bean;
			}
		};
	}

	@Bean
	public PartitionSettings partitionSettings() {
		return new PartitionSettings();
	}

	/**
	 * The database HAPI stores into, chosen by {@code --ims.db}: {@code h2} (in memory, the
	 * default) or {@code postgres} (with {@code --ims.jdbc-url}, {@code --ims.db-user} and
	 * {@code --ims.db-password}), each with HAPI's own Hibernate dialect for it.
	 */
	public record Database(String name, String driver, String dialect, String url, String user, String password) {

		static Database of(String name, String url, String h2Url, String user, String password) {
			return switch (name) {
				case "h2" -> new Database(name, "org.h2.Driver", HapiFhirH2Dialect.class.getName(),
						url.isBlank() ? h2Url : url, user.isBlank() ? "sa" : user, password);
				case "postgres" -> {
					if (!url.startsWith("jdbc:postgresql:")) {
						throw new IllegalArgumentException(
								"--ims.db=postgres needs --ims.jdbc-url=jdbc:postgresql://HOST:PORT/DATABASE");
					}
					yield new Database(name, "org.postgresql.Driver", HapiFhirPostgresDialect.class.getName(),
							url, user.isBlank() ? "hapi" : user, password);
				}
				default -> throw new IllegalArgumentException(
						"--ims.db=" + name + ": expected h2 or postgres");
			};
		}
	}

	@Bean
	public Database database(
			@Value("${ims.db:h2}") String name,
			@Value("${ims.jdbc-url:}") String url,
			@Value("${ims.h2-url:jdbc:h2:mem:ims;DB_CLOSE_DELAY=-1}") String h2Url,
			@Value("${ims.db-user:}") String user,
			@Value("${ims.db-password:}") String password) {
		return Database.of(name, url, h2Url, user, password);
	}

	@Bean
	public DataSource dataSource(Database database) {
		BasicDataSource dataSource = new BasicDataSource();
		dataSource.setDriverClassName(database.driver());
		dataSource.setUrl(database.url());
		dataSource.setUsername(database.user());
		dataSource.setPassword(database.password());
		dataSource.setMaxTotal(20);
		return dataSource;
	}

	@Primary
	@Bean
	public LocalContainerEntityManagerFactoryBean entityManagerFactory(
			ConfigurableListableBeanFactory beanFactory,
			FhirContext fhirContext,
			JpaStorageSettings storageSettings,
			Database database,
			DataSource dataSource) {
		LocalContainerEntityManagerFactoryBean factory =
				HapiEntityManagerFactoryUtil.newEntityManagerFactory(beanFactory, fhirContext, storageSettings);
		factory.setPersistenceUnitName("HAPI_PU");
		factory.setDataSource(dataSource);
		Properties jpa = new Properties();
		jpa.put("hibernate.dialect", database.dialect());
		jpa.put("hibernate.hbm2ddl.auto", "update");
		jpa.put("hibernate.format_sql", "false");
		jpa.put("hibernate.show_sql", "false");
		jpa.put("hibernate.jdbc.batch_size", "20");
		jpa.put("hibernate.cache.use_query_cache", "false");
		jpa.put("hibernate.cache.use_second_level_cache", "false");
		jpa.put("hibernate.search.enabled", "false");
		// The schema update answers each "DROP CONSTRAINT IF EXISTS" on PostgreSQL with a notice
		// that Hibernate would log as a warning: noise in the log attached to failing tests.
		jpa.put("hibernate.jdbc.log.warnings", "false");
		factory.setJpaProperties(jpa);
		return factory;
	}

	@Primary
	@Bean
	public JpaTransactionManager transactionManager(EntityManagerFactory entityManagerFactory) {
		JpaTransactionManager manager = new JpaTransactionManager();
		manager.setEntityManagerFactory(entityManagerFactory);
		return manager;
	}

	@Bean
	public RestfulServer restfulServer(
			IFhirSystemDao<?, ?> systemDao,
			ResourceProviderFactory resourceProviderFactory,
			JpaSystemProvider<?, ?> systemProvider,
			JpaStorageSettings storageSettings,
			ISearchParamRegistry searchParamRegistry,
			IValidationSupport validationSupport,
			DatabaseBackedPagingProvider pagingProvider,
			BulkDataExportProvider bulkDataExportProvider,
			Database database,
			@Value("${ims.page-size:20}") int pageSize) {
		RestfulServer server = new RestfulServer(systemDao.getContext());
		server.registerProviders(resourceProviderFactory.createProviders());
		server.registerProvider(systemProvider);
		server.registerProvider(bulkDataExportProvider);
		JpaCapabilityStatementProvider capabilities = new JpaCapabilityStatementProvider(
				server, systemDao, storageSettings, searchParamRegistry, validationSupport);
		capabilities.setImplementationDescription("ims-fhir test server (HAPI FHIR JPA, " + database.name() + ")");
		server.setServerConformanceProvider(capabilities);
		pagingProvider.setDefaultPageSize(pageSize);
		pagingProvider.setMaximumPageSize(500);
		server.setPagingProvider(pagingProvider);
		server.setDefaultResponseEncoding(EncodingEnum.JSON);
		server.setServerAddressStrategy(new IncomingRequestAddressStrategy());
		return server;
	}

	@Bean
	public ServletRegistrationBean<RestfulServer> fhirServlet(RestfulServer server) {
		ServletRegistrationBean<RestfulServer> registration = new ServletRegistrationBean<>(server, "/fhir/*");
		registration.setLoadOnStartup(1);
		return registration;
	}
}
